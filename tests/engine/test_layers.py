"""Imports run one way between the layers of docs/layout.md.

Every module of ``cas/``, ``fusefront/`` and ``tools/`` is parsed (``ast``, nothing is
imported) and each of its imports - at module level, inside functions and under
``TYPE_CHECKING`` alike - is checked against :data:`LAYERS`: a module may import its own
layer and the layers its row names, nothing else of casfs. Third-party packages are
checked too: the engine (``cas``) never imports the FUSE side (pyfuse3, trio), and the
metadata layer (``cas/db/``) imports only the standard library and PyMySQL.

A new module must fall in a row of the table (a new top-level ``cas/*.py`` fails here
until it is given a layer), so the table stays the map of the code.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent

# layer -> (modules: a name, or "pkg.*" for a package and everything under it,
#           the layers it may import besides itself). Bottom to top.
LAYERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "base": (("cas", "cas.errors", "cas.counters"), ()),
    # volume.toml, the master key, the audit log's set-up
    "config": (("cas.config.*",), ("base",)),
    # the metadata layer: connection, embedded server, TLS, schema, typed SQL per table group
    "db": (("cas.db.*",), ("base", "config")),
    # the chunk layer: envelope, local store, RAM cache, chunk manager
    "chunk": (("cas.chunk.*",), ("base", "config", "db")),
    # the cloud tier: object stores (Drive), packs and the upload queue, metadata snapshots
    "tier": (("cas.tier.*",), ("base", "config", "db", "chunk")),
    # the filesystem engine: namespace, file data and writeback, xattrs, sync status
    "engine": (("cas.engine.*",), ("base", "config", "db", "chunk", "tier")),
    # maintenance: gc, fsck, repair, scrub, stats, find/du, rescue
    "maint": (("cas.maint.*",), ("base", "config", "db", "chunk", "tier", "engine")),
    "fusefront": (("fusefront.*",), ("base", "config", "db", "chunk", "tier", "engine", "maint")),
    # the product's command line (the console scripts)
    "cli": (("tools", "tools.cli.*"),
            ("base", "config", "db", "chunk", "tier", "engine", "maint", "fusefront")),
    # benchmarks: not in the wheel
    "bench": (("tools.bench.*",),
              ("base", "config", "db", "chunk", "tier", "engine", "maint", "fusefront", "cli", "drivesim")),
    # the Drive v3 test server: not in the wheel, imports nothing of casfs
    "drivesim": (("tools.drivesim.*",), ()),
}

# Single imports allowed across layers, each with its reason.
EXCEPTIONS: dict[tuple[str, str], str] = {
    # the volume's compression spec ("zstd:3") is parsed where the codecs are defined
    ("cas.config.volume", "cas.chunk.envelope"): "parse_codec",
}

# Third-party top-level packages a layer must not import; "only" rows list all it may.
FORBIDDEN = {layer: {"pyfuse3", "trio"} for layer in ("base", "config", "db", "chunk", "tier", "engine", "maint")}
ONLY_THIRD_PARTY = {"db": {"pymysql"}}
CASFS_TOP = {"cas", "fusefront", "tools"}


def layer_of(module: str) -> str | None:
    """The layer of ``module`` (the most specific row that names it), None if none does."""
    best: tuple[int, str] | None = None
    for layer, (names, _) in LAYERS.items():
        for n in names:
            if n.endswith(".*"):
                pkg = n[:-2]
                hit = module == pkg or module.startswith(pkg + ".")
                size = len(pkg)
            else:
                hit = module == n
                size = len(n) + 1   # an exact name wins over a package prefix
            if hit and (best is None or size > best[0]):
                best = (size, layer)
    return best[1] if best else None


def modules() -> dict[str, Path]:
    """Every casfs module: dotted name -> file."""
    out: dict[str, Path] = {}
    for top in sorted(CASFS_TOP):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, imported module) of every import in ``path``; ``from P import name`` counts
    as an import of ``P.name`` when that is a module, else of ``P``."""
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.append((node.lineno, sub if sub in known else target))
    return found


def test_every_module_has_a_layer() -> None:
    unplaced = [m for m in modules() if layer_of(m) is None]
    assert not unplaced, f"modules in no layer of LAYERS (give each a row): {unplaced}"


def test_imports_run_one_way() -> None:
    mods = modules()
    known = set(mods)
    stdlib = set(sys.stdlib_module_names)
    bad: list[str] = []
    for module, path in mods.items():
        layer = layer_of(module)
        if layer is None:
            continue   # test_every_module_has_a_layer names it
        allowed = {layer, *LAYERS[layer][1]}
        for line, target in imports_of(module, path, known):
            top = target.partition(".")[0]
            where = f"{path.relative_to(ROOT)}:{line}: {module} ({layer}) imports {target}"
            if top in CASFS_TOP:
                tl = layer_of(target)
                if tl is None:
                    bad.append(f"{where}, a module in no layer")
                elif tl not in allowed and (module, target) not in EXCEPTIONS:
                    bad.append(f"{where} ({tl}): {layer} may import only {sorted(allowed)}")
            elif top in FORBIDDEN.get(layer, set()):
                bad.append(f"{where}: the engine never imports the FUSE side")
            elif layer in ONLY_THIRD_PARTY and top not in stdlib and top not in ONLY_THIRD_PARTY[layer] \
                    and top != "__future__":
                bad.append(f"{where}: {layer} may import only the standard library and "
                           f"{sorted(ONLY_THIRD_PARTY[layer])}")
    assert not bad, "imports against the layers of docs/layout.md:\n" + "\n".join(bad)


def test_the_chunk_layer_defines_the_cloud_interface() -> None:
    """The chunk layer reaches the cloud tier only through ``RemoteChunks``, which the
    cloud tier implements (checked structurally by mypy where the tier is attached)."""
    from cas.chunk.remote import RemoteChunks
    from cas.tier.cloud import CloudTier
    members = {"fetch", "keep_local", "ahead_room", "fetch_ahead", "fetch_ahead_prefix"}
    assert members <= set(dir(RemoteChunks)) and members <= set(dir(CloudTier))
    assert layer_of(RemoteChunks.__module__) == "chunk" and layer_of(CloudTier.__module__) == "tier"


def test_the_rules_catch_a_violation(tmp_path: Path) -> None:
    """The checker itself: an upward import, a FUSE import in the engine and a third-party
    import in the metadata layer are all reported."""
    probe = tmp_path / "probe.py"
    probe.write_text("import trio\nfrom cas.tier import cloud\nimport zstandard\nfrom . import batch\n")
    found = imports_of("cas.db.probe", probe, {"cas.tier.cloud", "cas.db.batch"})
    assert [t for _, t in found] == ["trio", "cas.tier.cloud", "zstandard", "cas.db.batch"]
    assert layer_of("cas.db.probe") == "db" and layer_of("cas.tier.cloud") == "tier"
    assert "tier" not in LAYERS["db"][1] and "tier" not in LAYERS["chunk"][1]
    assert layer_of("cas.newthing") is None and layer_of("cas.errors") == "base"
