"""The viewer's turns (web/transcript.js) follow the captions' own order, not the order in which their
streams reach the page: the relay forwards each caption stream once it is complete, and streams sent
one after the other can complete out of order. Run in headless Chromium on an empty page
(tests/test_web_unit.py `run_in_page`); the same with a real relay: test_web_browser.py."""

from __future__ import annotations

import json

import pytest

from tests.test_web_unit import run_in_page

pytestmark = pytest.mark.browser

# Segments as the agent sends them: [id, speaker, [[text, sent ms], ...]], interims then the final.
SEGMENTS = [
    ["SG_a", "gina", [["first", 1000], ["first line", 1100], ["first line", 1200]]],
    ["SG_e", "hugo", [["uh", 1300], ["", 1400]]],  # dropped by the agent: nothing was said
    ["SG_b", "gina", [["more", 1500], ["more from gina", 1600]]],
    ["SG_c", "hugo", [["second", 2000], ["second line", 2100], ["second line", 2200]]],
    ["SG_d", "gina", [["third", 2300], ["third line", 2400]]],
    ["SG_f", "hugo", [["fourth", 2350]]],  # a final alone, sent while Gina's third line was open
]
EXPECTED = [["Gina", ["first line", "more from gina"]], ["Hugo", ["second line"]], ["Gina", ["third line"]],
            ["Hugo", ["fourth"]]]

ORDER_JS = """
const speakers = new T.Speakers();
speakers.learn('gina', 'Gina');
speakers.learn('hugo', 'Hugo');
const updates = SEGMENTS.flatMap(([id, identity, texts]) => texts.map(([text, sent], seq) => (
  {id, identity, text, sent, seq, final: seq === texts.length - 1})));
let seed = 7;
const random = () => { seed = (seed * 1103515245 + 12345) % 2147483648; return seed / 2147483648; };
const shuffled = (list) => {
  const out = [...list];
  for (let i = out.length - 1; i > 0; i -= 1) {
    const j = Math.floor(random() * (i + 1));
    [out[i], out[j]] = [out[j], out[i]];
  }
  return out;
};
const orders = [updates, [...updates].reverse(), ...Array.from({length: 300}, () => shuffled(updates))];
// The page as its reader sees it after `order` (with each update's captions.sent, or without).
const layout = (order, withSent) => {
  const container = document.createElement('main');
  const empty = document.createElement('p');
  container.append(empty);
  document.body.append(container);
  const transcript = new T.Transcript(container, empty, speakers);
  for (const u of order) {
    transcript.update({id: u.id, identity: u.identity, text: u.text, final: u.final, seq: u.seq,
                       sent: withSent ? u.sent : undefined, start: u.sent / 1000, agent: 'agent-1',
                       words: u.final && u.text ? u.text.split(' ').map((w, i) => [w, i, i + 0.5]) : []});
  }
  const turns = [...container.querySelectorAll('.turn')].map((t) => [
    t.querySelector('.name').textContent,
    [...t.querySelectorAll('.seg')].map((s) => s.textContent + (s.classList.contains('interim') ? ' (interim)' : ''))]);
  container.remove();
  return JSON.stringify(turns);
};
return {
  bySent: [...new Set(orders.map((order) => layout(order, true)))],
  byArrival: new Set(orders.map((order) => layout(order, false))).size,
};
"""


def test_turns_are_the_same_whatever_order_the_caption_streams_arrive_in():
    """302 arrival orders of the same updates (interims after their final, a segment's first update
    after its later ones, a dropped segment's interim after its empty final): one page, the one the
    captions were sent as. Without captions.sent the page would follow the arrival order."""
    out = run_in_page(f"const SEGMENTS = {json.dumps(SEGMENTS)};" + ORDER_JS)
    assert [json.loads(layout) for layout in out["bySent"]] == [EXPECTED]
    assert out["byArrival"] > 1, "the orders tried do not exercise the arrival order"


def test_a_late_segment_splits_the_backlogs_last_turn_that_a_later_one_continued():
    """Gina's live line continues her backlog turn; Hugo's line, sent before it but come after it,
    goes between the two, in a turn of its own; her live line keeps a turn, not marked as backlog.
    Its dropped final later takes it away again, and Gina's lines are one turn again."""
    out = run_in_page("""
        const speakers = new T.Speakers();
        speakers.learn('hugo', 'Hugo');
        const transcript = new T.Transcript(document.getElementById('captions'), document.getElementById('empty'),
                                            speakers);
        const turns = () => [...document.querySelectorAll('#captions .turn')].map((t) => [
          t.querySelector('.name').textContent, t.classList.contains('backlog'),
          [...t.querySelectorAll('.seg')].map((s) => s.textContent)]);
        transcript.addBacklog([{segment_id: 'SG_old', participant_identity: 'gina', participant_name: 'Gina',
                                text: 'said before', start: 1, end: 2, words: []}]);
        const update = (id, identity, text, final, seq, sent) => transcript.update(
          {id, identity, text, final, seq, sent, start: sent / 1000, agent: 'agent-1', words: []});
        update('SG_g', 'gina', 'gina live', true, 0, 2000);
        const continued = turns();
        update('SG_h', 'hugo', 'hugo late', false, 0, 1500);
        const split = turns();
        update('SG_h', 'hugo', '', true, 1, 1600);
        return {continued, split, merged: turns()};
    """)
    assert out["continued"] == [["Gina", True, ["said before", "gina live"]]]
    assert out["split"] == [["Gina", True, ["said before"]], ["Hugo", False, ["hugo late"]],
                            ["Gina", False, ["gina live"]]]
    assert out["merged"] == [["Gina", True, ["said before", "gina live"]]]
