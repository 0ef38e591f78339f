// Transcript export: plain text, SubRip (SRT) and WebVTT from the final caption segments.
//
// A segment is {name, text, start, end, words}, times in Unix epoch seconds; `words` holds
// [word, start, end] triples from the agent's captions.words attribute. Export times are relative to
// the first caption, so a file starts at 00:00:00.

const MAX_CUE_SECONDS = 7;
const MAX_CUE_WORDS = 14;
const MIN_CUE_SECONDS = 0.5;

/** Segments in time order with a usable start and end (words win over the segment's own times). */
function timedSegments(segments) {
  const timed = [];
  for (const segment of segments) {
    const words = (segment.words || []).filter(
      (w) => Array.isArray(w) && Number.isFinite(w[1]) && Number.isFinite(w[2]),
    );
    const start = words.length ? words[0][1] : segment.start;
    const end = words.length ? words[words.length - 1][2] : segment.end;
    if (!Number.isFinite(start) || !segment.text) continue;
    timed.push({ ...segment, words, start, end: Number.isFinite(end) ? end : start });
  }
  return timed.sort((a, b) => a.start - b.start);
}

/** Splits a segment into cues of readable length along its word times. */
function cuesOf(segment) {
  if (!segment.words.length) return [{ start: segment.start, end: segment.end, text: segment.text }];
  const cues = [];
  let current = null;
  for (const [word, start, end] of segment.words) {
    const tooLong = current && (end - current.start > MAX_CUE_SECONDS || current.words.length >= MAX_CUE_WORDS);
    if (!current || tooLong) {
      current = { start, end, words: [] };
      cues.push(current);
    }
    current.words.push(word);
    current.end = Math.max(current.end, end);
  }
  return cues.map((c) => ({ start: c.start, end: c.end, text: c.words.join(' ') }));
}

/** All cues of the transcript, relative seconds, starts never decreasing, every cue at least 0.5 s. */
export function buildCues(segments) {
  const timed = timedSegments(segments);
  if (!timed.length) return [];
  const origin = timed[0].start;
  const cues = [];
  for (const segment of timed) {
    for (const cue of cuesOf(segment)) {
      const start = Math.max(0, cue.start - origin);
      const end = Math.max(start + MIN_CUE_SECONDS, cue.end - origin);
      cues.push({ start, end, speaker: segment.name, text: oneLine(cue.text) });
    }
  }
  return cues.sort((a, b) => a.start - b.start);
}

/** Cue text must not contain line breaks: a blank line ends a cue in both SRT and WebVTT. */
function oneLine(text) {
  return String(text).replace(/\s+/g, ' ').trim();
}

function clock(seconds, separator) {
  const ms = Math.round(seconds * 1000);
  const pad = (n, width = 2) => String(n).padStart(width, '0');
  const h = Math.floor(ms / 3600000);
  const m = Math.floor((ms % 3600000) / 60000);
  const s = Math.floor((ms % 60000) / 1000);
  return `${pad(h)}:${pad(m)}:${pad(s)}${separator}${pad(ms % 1000, 3)}`;
}

/** "[00:00:03] Alice: hello there" lines, one per final segment. */
export function toText(segments) {
  const timed = timedSegments(segments);
  if (!timed.length) return '';
  const origin = timed[0].start;
  return timed
    .map((s) => `[${clock(s.start - origin, '.').slice(0, 8)}] ${oneLine(s.name)}: ${oneLine(s.text)}`)
    .join('\n') + '\n';
}

/** SubRip: numbered cues, comma before the milliseconds, "Speaker: text". */
export function toSrt(segments) {
  return buildCues(segments)
    .map((c, i) => `${i + 1}\n${clock(c.start, ',')} --> ${clock(c.end, ',')}\n${oneLine(c.speaker)}: ${c.text}\n`)
    .join('\n');
}

/** WebVTT cue text is markup: escape it so a name or caption is always shown as text. */
function vttEscape(text) {
  return String(text).replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}

/** WebVTT with the speaker as a voice span (<v Name>), which players show or style. */
export function toVtt(segments) {
  const body = buildCues(segments)
    .map((c) => `${clock(c.start, '.')} --> ${clock(c.end, '.')}\n<v ${vttEscape(oneLine(c.speaker))}>${vttEscape(c.text)}\n`)
    .join('\n');
  return `WEBVTT\n\n${body}`;
}

export const FORMATS = {
  txt: { render: toText, type: 'text/plain', extension: 'txt' },
  srt: { render: toSrt, type: 'application/x-subrip', extension: 'srt' },
  vtt: { render: toVtt, type: 'text/vtt', extension: 'vtt' },
};
