"""TLS to an external metadata server: the ``[meta]`` table of volume.toml.

A volume on an external MySQL/MariaDB server (``meta_url``) may require TLS::

    [meta]
    tls = "required"          # "required" | "preferred" | "off"
    ca_file = "/etc/casfs/db-ca.pem"   # CA bundle the server's certificate must chain to
                                       # ("" = the system's CAs)
    verify = true             # check the certificate chain and that it names the URL's host
    cert_file = ""            # client certificate and key (REQUIRE X509 accounts), PEM
    key_file = ""

* ``required``: every connection is TLS, verified against ``ca_file`` and the URL's host
  name (IP addresses match an IP subjectAltName) unless ``verify = false``. A server that
  does not offer TLS is refused before any credentials are sent (PyMySQL >= 1.2 with TLS
  parameters; casfs checks the session is encrypted once more after connecting), so a
  man in the middle that strips TLS from the handshake gets nothing.
* ``preferred``: PyMySQL's default since 1.2, TLS when the server offers it, unverified;
  also what a volume without a ``tls`` key gets (unchanged behaviour).
* ``off``: never TLS.

The embedded server is reached through its private unix socket only (docs/security.md)
and takes no ``[meta]`` settings. docs/database.md, "TLS to an external server".
"""
from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

from cas.errors import MetaError

TLS_MODES = ("required", "preferred", "off")
REQUIRED, PREFERRED, OFF = TLS_MODES


@dataclass(frozen=True)
class TlsSettings:
    """The ``[meta]`` TLS settings of a volume; paths are absolute ("" = unset)."""

    mode: str = PREFERRED
    ca_file: str = ""
    verify: bool = True
    cert_file: str = ""
    key_file: str = ""

    def to_config(self) -> dict[str, object]:
        """The ``[meta]`` table for volume.toml (keys left at their default omitted)."""
        cfg: dict[str, object] = {"tls": self.mode}
        if self.ca_file:
            cfg["ca_file"] = self.ca_file
        if not self.verify:
            cfg["verify"] = False
        if self.cert_file:
            cfg["cert_file"] = self.cert_file
        if self.key_file:
            cfg["key_file"] = self.key_file
        return cfg


def from_config(table: dict[str, object]) -> TlsSettings | None:
    """TlsSettings from a volume's ``[meta]`` table; None when it has no ``tls`` key
    (PyMySQL's default applies). Raises MetaError (one line) for a bad value."""
    if "tls" not in table:
        return None
    mode = table.get("tls")
    if mode not in TLS_MODES:
        raise MetaError(f"volume.toml [meta] tls = {mode!r}: use one of {', '.join(TLS_MODES)}")
    verify = table.get("verify", True)
    if not isinstance(verify, bool):
        raise MetaError(f"volume.toml [meta] verify = {verify!r}: use true or false")
    paths = {}
    for key in ("ca_file", "cert_file", "key_file"):
        v = table.get(key, "")
        if not isinstance(v, str):
            raise MetaError(f"volume.toml [meta] {key} = {v!r}: a file path is expected")
        paths[key] = v
    if bool(paths["cert_file"]) != bool(paths["key_file"]):
        raise MetaError("volume.toml [meta]: cert_file and key_file go together")
    return TlsSettings(mode=str(mode), verify=verify, **paths)


def ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    """The client SSLContext of ``tls`` (TLS >= 1.2; CA, verification, client cert).
    Raises MetaError naming the file that cannot be read or parsed."""
    try:
        ctx = ssl.create_default_context(cafile=tls.ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise MetaError(f"cannot load the CA file {tls.ca_file} (volume.toml [meta] ca_file): "
                        f"{getattr(exc, 'strerror', None) or exc}") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if tls.cert_file:
        try:
            ctx.load_cert_chain(tls.cert_file, tls.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise MetaError(f"cannot load the client certificate {tls.cert_file} / key {tls.key_file}: "
                            f"{getattr(exc, 'strerror', None) or exc}") from exc
    return ctx


def connect_args(tls: TlsSettings | None) -> dict[str, Any]:
    """Keyword arguments for pymysql.connect: ``ssl`` (an SSLContext: PyMySQL then
    requires TLS) for "required", ``ssl_disabled`` for "off", nothing otherwise. Raises
    MetaError (:func:`ssl_context`)."""
    if tls is None or tls.mode == PREFERRED:
        return {}
    if tls.mode == OFF:
        return {"ssl_disabled": True}
    return {"ssl": ssl_context(tls)}


def is_encrypted(conn: Any) -> bool:
    """Whether PyMySQL connection ``conn`` talks TLS (its socket is an SSLSocket)."""
    return isinstance(getattr(conn, "_sock", None), ssl.SSLSocket)


def tls_error(code: int, msg: str) -> bool:
    """Whether a PyMySQL error (``code``, ``msg``) is a TLS failure: CR_SSL_CONNECTION_ERROR
    (2026), or a connect error (2003) whose cause is an SSL error (a certificate that
    does not verify, a host name it does not name, a handshake failure)."""
    return code == 2026 or (code == 2003 and ("SSL" in msg or "certificate" in msg))
