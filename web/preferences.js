// The reader's display preferences (text size, theme, the language read), kept in localStorage.

const PREFS_KEY = 'captions.viewer.prefs';
const FONT_SIZES = [14, 16, 18, 20, 24, 28, 32, 40, 48];
const DEFAULTS = { fontSize: 20, theme: 'system', language: '' };

export class Preferences {
  /** `themePicker`: the <select> that shows the theme; `overlay`: the overlay sets its own size. */
  constructor(themePicker, overlay) {
    this.themePicker = themePicker;
    this.overlay = overlay;
    this.values = Preferences.load();
  }

  static load() {
    try {
      return { ...DEFAULTS, ...JSON.parse(localStorage.getItem(PREFS_KEY) || '{}') };
    } catch {
      return { ...DEFAULTS };
    }
  }

  apply() {
    const root = document.documentElement;
    root.dataset.theme = this.values.theme;
    if (!this.overlay) root.style.setProperty('--caption-size', `${this.values.fontSize}px`);
    this.themePicker.value = this.values.theme;
  }

  save() {
    try {
      localStorage.setItem(PREFS_KEY, JSON.stringify(this.values));
    } catch {
      // Private browsing may refuse storage: the settings still apply to this page.
    }
    this.apply();
  }

  /** The language read ('' for the originals). */
  setLanguage(language) {
    this.values.language = language;
    this.save();
  }

  setTheme(theme) {
    this.values.theme = theme;
    this.save();
  }

  stepFontSize(direction) {
    const index = FONT_SIZES.findIndex((size) => size >= this.values.fontSize);
    const current = index < 0 ? FONT_SIZES.length - 1 : index;
    this.values.fontSize = FONT_SIZES[Math.min(FONT_SIZES.length - 1, Math.max(0, current + direction))];
    this.save();
  }
}
