"""A client of the admin API for the ops CLI, and plain-text renderers of its answers."""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from multidict import CIMultiDictProxy
from yarl import URL

from gateway.errors import AdminClientError

_CELL_CHARS = 32
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Co", "Zs"})


class AdminClient:
    """Calls a running gateway's admin API; every call is bounded by `timeout` seconds."""

    def __init__(self, base_url: str, token: str, timeout: float = 5.0) -> None:
        url = URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise AdminClientError(f"Invalid admin API URL {base_url!r}: expected http://HOST:PORT")
        if timeout <= 0:
            raise AdminClientError("The admin API timeout must be > 0 seconds")
        self._base = str(url).rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AdminClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection pool."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def list_devices(
        self, name: str | None = None, blocked: str = "all", page: int = 1, amount: int = 20
    ) -> tuple[list[dict[str, Any]], int]:
        """One page of devices and the total that match the filters."""
        query = {"blocked": blocked, "page": str(page), "amount": str(amount)}
        if name:
            query["name"] = name
        result, headers = await self._call("GET", "/devices", query=query)
        if not isinstance(result, list) or not all(isinstance(d, dict) for d in result):
            raise self._unexpected("GET", "/devices")
        total = headers.get("X-Total-Count", "")
        if not total.isdigit():
            raise self._unexpected("GET", "/devices")
        return result, int(total)

    async def get_device(self, device_id: str) -> dict[str, Any]:
        """One device record."""
        return await self._record("GET", _device_path(device_id))

    async def history(self, device_id: str) -> list[dict[str, Any]]:
        """The device's software and hardware changes, newest first."""
        path = _device_path(device_id, "/history")
        result, _ = await self._call("GET", path)
        if not isinstance(result, list):
            raise self._unexpected("GET", path)
        return result

    async def block(self, device_id: str) -> dict[str, Any]:
        """Block a device (an id never seen is blocked in advance)."""
        return await self._record("POST", _device_path(device_id, "/block"))

    async def unblock(self, device_id: str) -> dict[str, Any]:
        """Unblock a device."""
        return await self._record("POST", _device_path(device_id, "/unblock"))

    async def rename(self, device_id: str, name: str | None) -> dict[str, Any]:
        """Set the custom name; None or "" clears it."""
        return await self._record("PUT", _device_path(device_id), body={"name": name})

    async def delete(self, device_id: str) -> None:
        """Remove a device record."""
        await self._call("DELETE", _device_path(device_id))

    async def set_rate_limit(self, device_id: str, rate: float, burst: int) -> dict[str, Any]:
        """Give a device its own bucket: `rate` tokens per second, `burst` tokens."""
        body = {"rate": rate, "burst": burst}
        return await self._record("PUT", _device_path(device_id, "/rate_limit"), body=body)

    async def delete_rate_limit(self, device_id: str) -> None:
        """Remove a device's own bucket."""
        await self._call("DELETE", _device_path(device_id, "/rate_limit"))

    async def _record(
        self, method: str, path: str, body: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        result, _ = await self._call(method, path, body=body)
        if not isinstance(result, dict):
            raise self._unexpected(method, path)
        return result

    async def _call(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> tuple[Any, CIMultiDictProxy[str]]:
        # `path` is already percent-encoded: keep yarl from decoding %2F inside an id.
        url = URL(self._base + path, encoded=True)
        if query:
            url = url.with_query(query)
        data = None if body is None else orjson.dumps(body)
        headers = dict(self._headers)
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            async with self._get_session().request(
                method, url, data=data, headers=headers, allow_redirects=False
            ) as resp:
                raw = await resp.read()
                status, reason, resp_headers = resp.status, resp.reason, resp.headers
        except TimeoutError as exc:
            raise AdminClientError(
                f"The admin API at {self._base} did not answer within {self._timeout:g} s"
            ) from exc
        except aiohttp.ClientError as exc:
            raise AdminClientError(f"Cannot reach the admin API at {self._base}: {exc}") from exc
        payload = _envelope(raw)
        if payload is not None and payload[0] and 200 <= status < 300:
            return payload[1], resp_headers
        if payload is not None and not payload[0] and isinstance(payload[1], str):
            message = payload[1]
        else:
            message = f"unexpected answer ({reason or 'no reason'})"
        if status == 401:
            message += "; check the admin token"
        raise AdminClientError(f"Admin API: {message} (HTTP {status} on {method} {path})")

    def _get_session(self) -> aiohttp.ClientSession:
        # Created on first use, inside the running event loop.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout)
            )
        return self._session

    def _unexpected(self, method: str, path: str) -> AdminClientError:
        return AdminClientError(f"Admin API: unexpected answer to {method} {path}")


def _device_path(device_id: str, suffix: str = "") -> str:
    # Every character but unreserved ones is percent-encoded, `/` included (as %2F).
    return f"/devices/{quote(device_id, safe='')}{suffix}"


def _envelope(raw: bytes) -> tuple[bool, Any] | None:
    """(status, result) of a `{status, result}` answer, or None when it is not one."""
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("status"), bool):
        return None
    if "result" not in payload:
        return None
    return payload["status"], payload["result"]


# ---- rendering (pure) ----------------------------------------------------------------------


def _clean(value: object) -> str:
    """Printable text: None -> "-"; each hidden character shown as `<U+202E>` style text."""
    if value is None or value == "":
        return "-"
    return "".join(f"<U+{ord(ch):04X}>" if _hidden(ch) else ch for ch in str(value))


def _hidden(ch: str) -> bool:
    """A character that could hide, reorder or fake text on a terminal.

    Controls (an escape sequence rewrites the screen), format characters (U+202E right-to-left
    override, zero-width ones, the BOM), line and paragraph separators, private use, and every
    space but the plain U+0020. The admin page's static/text.js shows the same set.
    """
    return ch != " " and unicodedata.category(ch) in _HIDDEN_CATEGORIES


def _width(text: str) -> int:
    """Terminal columns: wide East Asian characters take two, combining marks none."""
    total = 0
    for ch in text:
        if unicodedata.combining(ch):
            continue
        total += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return total


def _fit(text: str, limit: int) -> str:
    if _width(text) <= limit:
        return text
    while _width(text) > limit - 1:
        text = text[:-1]
    return text + "…"


def _pad(text: str, width: int) -> str:
    return text + " " * (width - _width(text))


def _when(iso: object, *, millis: bool = False) -> str:
    """`2026-11-03T23:24:19.787Z` -> `2026-11-03 23:24:19` (UTC); "-" when absent."""
    if not isinstance(iso, str) or len(iso) < 19:
        return _clean(iso)
    text = iso[:10] + " " + iso[11:19]
    if millis and len(iso) >= 23 and iso[19] == ".":
        text += iso[19:23]
    return _clean(text)


def _joined(*parts: object) -> str:
    return _clean(" ".join(str(p) for p in parts if p))


def render_table(devices: list[dict[str, Any]], total: int) -> str:
    """A readable table of one page of devices, with a count line."""
    if not devices:
        return "No devices." if total == 0 else f"No devices on this page ({total} in total)."
    header = ("ID", "NAME", "APPLICATION", "DEVICE", "LAST ACTIVITY (UTC)", "STATUS")
    rows = [
        (
            _clean(d.get("id")),
            _fit(_clean(d.get("name")), _CELL_CHARS),
            _fit(_joined(d.get("application"), d.get("application_version")), _CELL_CHARS),
            _fit(_joined(d.get("manufacturer"), d.get("model")), _CELL_CHARS),
            _when(d.get("last_activity")),
            "blocked" if d.get("blocked") else "active",
        )
        for d in devices
    ]
    widths = [max(_width(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(_pad(cell, widths[i]) for i, cell in enumerate(row)).rstrip()
        for row in [header, *rows]
    ]
    noun = "device" if total == 1 else "devices"
    lines.append(f"{len(devices)} of {total} {noun}")
    return "\n".join(lines)


def _requests(device: dict[str, Any]) -> str:
    return _clean(f"{device.get('request_count', 0)} ({device.get('denied_count', 0)} denied)")


def render_device(device: dict[str, Any]) -> str:
    """A readable detail view of one device record, labelled as on the web page."""
    limit = device.get("rate_limit")
    rate_limit = "default"
    if isinstance(limit, dict) and isinstance(limit.get("rate"), int | float):
        rate_limit = f"{limit['rate']:g} per second, burst {limit.get('burst')}"
    blocked = device.get("blocked")
    fields = (
        ("Name", _clean(device.get("name") or "(not set)")),
        ("Identifier", _clean(device.get("id"))),
        ("Manufacturer", _clean(device.get("manufacturer"))),
        ("Model", _clean(device.get("model"))),
        ("Application", _joined(device.get("application"), device.get("application_version"))),
        ("Operating system", _joined(device.get("os"), device.get("os_version"))),
        ("First seen", _when(device.get("first_seen"), millis=True)),
        ("Last data upload", _when(device.get("last_data_upload"), millis=True)),
        ("Last active", _when(device.get("last_active"), millis=True)),
        ("Blocked at", _when(device.get("blocked_at"), millis=True) if blocked else "-"),
        ("Status", "blocked" if blocked else "active"),
        ("Requests", _requests(device)),
        ("Rate limit", _clean(rate_limit)),
    )
    label_width = max(len(label) for label, _ in fields)
    lines = [f"{label.ljust(label_width)}  {value}" for label, value in fields]
    lines.append("(times in UTC)")
    return "\n".join(lines)
