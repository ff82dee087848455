// Admin API paths relative to the page, built so that the browser's URL parser cannot turn a
// device id into another resource. An ES module: app.js imports it, and so do the tests
// (through node), which resolve its output exactly as fetch() does.

// encodeURIComponent escapes everything but A-Z a-z 0-9 - _ . ! ~ * ' ( ), so a device's
// segment never holds "/", "?" or "#". Only an id that is exactly "." or ".." stays a dot
// segment, and the URL parser removes those however they are spelled (%2e too): no path
// names such a device. The data plane refuses those ids; older records keep them.
const DOT_SEGMENTS = new Set([".", ".."]);

/** The page-relative path of device `id` plus `suffix` ("", "/block", ...). */
export function devicePath(id, suffix = "") {
  if (DOT_SEGMENTS.has(id)) {
    throw new Error(
      `Device "${id}" cannot be managed from this page: use \`gateway devices\` or the API`,
    );
  }
  return "devices/" + encodeURIComponent(id) + suffix;
}
