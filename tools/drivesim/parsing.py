"""drivesim's parsers for what Drive clients send: ``fields`` masks, the files.list ``q``
language, MIME multipart bodies (uploads, batches) and ``Content-Range`` headers. Bad input
raises the Drive error a real server would answer with."""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from tools.drivesim.protocol import _ApiError, _bad_request


# -- field masks: "nextPageToken, files(id,name)", "files/id", "*" -----------------------

Mask = dict[str, "Mask | None"]


def parse_fields(text: str) -> Mask:
    """Parse a Drive ``fields`` mask into a tree (a None leaf selects the whole value):
    ``a,b(c,d),e/f`` -> ``{"a": None, "b": {"c": None, "d": None}, "e": {"f": None}}``."""
    pos = 0
    name_re = re.compile(r"\s*([A-Za-z_*][A-Za-z0-9_]*)\s*")

    def fail() -> _ApiError:
        return _bad_request(f"Invalid field selection {text}", "invalidParameter")

    def item(out: Mask) -> None:
        nonlocal pos
        m = name_re.match(text, pos)
        if not m:
            raise fail()
        name, pos = m.group(1), m.end()
        sub: Mask | None = None
        if text.startswith("(", pos):
            pos += 1
            sub = items()
            if not text.startswith(")", pos):
                raise fail()
            pos += 1
        elif text.startswith("/", pos):
            pos += 1
            sub = {}
            item(sub)
        out[name] = _merge(out[name], sub) if name in out else sub
        while pos < len(text) and text[pos].isspace():
            pos += 1

    def items() -> Mask:
        nonlocal pos
        out: Mask = {}
        item(out)
        while text.startswith(",", pos):
            pos += 1
            item(out)
        return out

    mask = items()
    if pos != len(text):
        raise fail()
    return mask


def _merge(a: Mask | None, b: Mask | None) -> Mask | None:
    if a is None or b is None:
        return None
    return {**a, **{k: _merge(a[k], v) if k in a else v for k, v in b.items()}}


def apply_fields(obj: dict[str, Any], mask: Mask | None) -> dict[str, Any]:
    """Keep only the parts of ``obj`` that ``mask`` selects."""
    if mask is None or "*" in mask:
        return obj
    out: dict[str, Any] = {}
    for key, sub in mask.items():
        if key not in obj:
            continue
        value = obj[key]
        if sub is not None and isinstance(value, list):
            value = [apply_fields(v, sub) if isinstance(v, dict) else v for v in value]
        elif sub is not None and isinstance(value, dict):
            value = apply_fields(value, sub)
        out[key] = value
    return out


# -- the q language --------------------------------------------------------------------

_TOKEN = re.compile(r"\s*(?:(?P<str>'(?:[^'\\]|\\.)*')|(?P<op>!=|=|\(|\)|\{|\})"
                    r"|(?P<word>[A-Za-z_][A-Za-z0-9_]*))")
Predicate = Callable[[dict[str, Any]], bool]


def parse_query(q: str, root_id: str) -> Predicate:
    """Compile a files.list ``q`` into a predicate over file records (see the package doc)."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(q):
        m = _TOKEN.match(q, pos)
        if not m or m.end() == pos:
            if q[pos:].strip() == "":
                break
            raise _invalid_q()
        pos = m.end()
        kind = m.lastgroup or ""
        value = m.group(kind)
        if kind == "str":
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        tokens.append((kind, value))
    i = 0

    def peek(value: str | None = None) -> bool:
        return i < len(tokens) and (value is None or tokens[i][1] == value) and tokens[i][0] != "str"

    def take(kind: str | None = None, value: str | None = None) -> str:
        nonlocal i
        if i >= len(tokens) or (kind and tokens[i][0] != kind) or (value and tokens[i][1] != value):
            raise _invalid_q()
        i += 1
        return tokens[i - 1][1]

    def expr() -> Predicate:
        terms = [term()]
        while peek("or"):
            take()
            terms.append(term())
        return terms[0] if len(terms) == 1 else (lambda f: any(t(f) for t in terms))

    def term() -> Predicate:
        factors = [factor()]
        while peek("and"):
            take()
            factors.append(factor())
        return factors[0] if len(factors) == 1 else (lambda f: all(p(f) for p in factors))

    def factor() -> Predicate:
        if peek("not"):
            take()
            inner = factor()
            return lambda f: not inner(f)
        if peek("("):
            take()
            inner = expr()
            take("op", ")")
            return inner
        if i < len(tokens) and tokens[i][0] == "str":
            parent = take("str")
            take("word", "in")
            take("word", "parents")
            parent = root_id if parent == "root" else parent
            return lambda f: parent in f.get("parents", [])
        name = take("word")
        if name in ("appProperties", "properties"):
            take("word", "has")
            take("op", "{")
            take("word", "key")
            take("op", "=")
            key = take("str")
            take("word", "and")
            take("word", "value")
            take("op", "=")
            value = take("str")
            take("op", "}")
            return lambda f: f.get(name, {}).get(key) == value
        op = take()
        if name == "trashed" and op in ("=", "!="):
            flag = take("word")
            if flag not in ("true", "false"):
                raise _invalid_q()
            want = (flag == "true") == (op == "=")
            return lambda f: bool(f.get("trashed")) == want
        if name in ("name", "mimeType") and op in ("=", "!="):
            value = take("str")
            eq = op == "="
            return lambda f: (f.get(name) == value) == eq
        if name == "name" and op == "contains":
            value = take("str")
            return lambda f: any(w.startswith(value) for w in [f["name"], *f["name"].split()])
        raise _invalid_q()

    if not tokens:
        return lambda f: True
    pred = expr()
    if i != len(tokens):
        raise _invalid_q()
    return pred


def _invalid_q() -> _ApiError:
    return _ApiError(400, "invalid", "Invalid Value")


# -- multipart bodies ------------------------------------------------------------------

def _boundary(content_type: str) -> bytes:
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        raise _bad_request("Missing boundary in multipart content type")
    return m.group(1).encode()


def split_multipart(body: bytes, boundary: bytes) -> list[bytes]:
    """The parts of a MIME multipart body. Line ends (LF, as the Google client writes, or
    CRLF) are taken from the first delimiter line, so binary content keeps its bytes."""
    delim = b"--" + boundary
    start = body.find(delim)
    if start < 0:
        raise _bad_request("Malformed multipart body")
    eol = body.find(b"\n", start)
    nl = b"\r\n" if eol > 0 and body[eol - 1:eol] == b"\r" else b"\n"
    parts, pos = [], start + len(delim)
    while not body.startswith(b"--", pos):
        eol = body.find(b"\n", pos)
        if eol < 0:
            raise _bad_request("Malformed multipart body")
        pos = eol + 1
        end = body.find(nl + delim, pos - len(nl))
        if end < 0:
            raise _bad_request("Malformed multipart body")
        parts.append(body[pos:max(end, pos)])
        pos = end + len(nl) + len(delim)
    return parts


def split_head(part: bytes) -> tuple[dict[str, str], bytes]:
    """Split a MIME part or an HTTP message into (lower-cased headers, body)."""
    m = re.search(rb"\r?\n\r?\n", part)
    head, body = (part[:m.start()], part[m.end():]) if m else (part, b"")
    headers: dict[str, str] = {}
    last = ""
    for line in head.decode("utf-8", "replace").splitlines():
        if line[:1] in (" ", "\t") and last:
            headers[last] += " " + line.strip()
        elif ":" in line:
            key, value = line.split(":", 1)
            last = key.strip().lower()
            headers[last] = value.strip()
    return headers, body


# -- Content-Range ---------------------------------------------------------------------

def _parse_content_range(value: str) -> tuple[int | None, int | None, int | None]:
    """``bytes a-b/T`` -> (a, b, T); ``bytes */T`` -> (None, None, T); ``*`` totals -> None."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*", value)
    if not m:
        raise _bad_request(f"Invalid Content-Range: {value}")
    a, b, t = m.groups()
    return (None if a is None else int(a), None if b is None else int(b),
            None if t == "*" else int(t))
