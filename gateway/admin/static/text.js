// Device fields for display: characters that hide, reorder or fake text (U+202E right-to-left
// override, zero-width characters, the BOM, odd spaces, private-use glyphs) are shown as
// visible markers instead of being passed to the page. The stored value is left as it is.

// Unicode categories Cc, Cf, Zl, Zp, Co and Zs; the plain space U+0020 is the one Zs kept
// (the same set as gateway/admin_client.py's terminal rendering).
const HIDDEN = /[\p{Cc}\p{Cf}\p{Zl}\p{Zp}\p{Co}\p{Zs}]/u;

function marker(ch) {
  return "U+" + ch.codePointAt(0).toString(16).toUpperCase().padStart(4, "0");
}

/** `text` as parts [{text, escaped}]: an escaped part is one hidden character as "U+XXXX". */
export function displayParts(text) {
  const parts = [];
  let plain = "";
  for (const ch of String(text)) {
    // for...of walks code points: a character beyond U+FFFF is one marker, not two halves.
    if (ch !== " " && HIDDEN.test(ch)) {
      if (plain) parts.push({ text: plain, escaped: false });
      plain = "";
      parts.push({ text: marker(ch), escaped: true });
    } else {
      plain += ch;
    }
  }
  if (plain) parts.push({ text: plain, escaped: false });
  return parts;
}

/** `text` flattened for an attribute (a tooltip): hidden characters as "<U+XXXX>". */
export function displayText(text) {
  return displayParts(text)
    .map((part) => (part.escaped ? `<${part.text}>` : part.text))
    .join("");
}
