"""Tests for tracejail.runtime_loads: which run-time loads fire, and what a fired rule makes glibc
read and dlopen() in a tree (NSS modules from nsswitch.conf, gconv modules from the gconv-modules
files, fixed libraries), with the configuration read inside the tree, never the host's.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tracejail.root import Root
from tracejail.runtime_loads import (
    NSSWITCH_CONF,
    RUNTIME_LOADS,
    Expansion,
    LoadKind,
    RuntimeFile,
    RuntimeLoad,
    expand,
    matching_trigger_path,
    nss_module_name,
    parse_gconv_modules,
    parse_nsswitch,
)

RULES = {rule.name: rule for rule in RUNTIME_LOADS}
NSS, GCONV, LIBGCC_S = RULES["nss"], RULES["gconv"], RULES["libgcc_s"]
LIBDIR = "/usr/lib/x86_64-linux-gnu"
GCONV_DIR = f"{LIBDIR}/gconv"
TRIGGER = "/etc/nsswitch.conf in the trace"


# --- helpers -----------------------------------------------------------------


def write(root: Path, path: str, text: str | bytes) -> Path:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        target.write_bytes(text)
    else:
        target.write_text(text)
    return target


def nss_reason(service: str, databases: str, trigger: str = TRIGGER) -> str:
    return f"{NSS.why}: service '{service}' for {databases} in /etc/nsswitch.conf; triggered by {trigger}"


def nss_config(trigger: str = TRIGGER) -> RuntimeFile:
    return RuntimeFile("/etc/nsswitch.conf", f"configures NSS; triggered by {trigger}")


def modules(expansion: Expansion) -> list[str]:
    return [lib.path for lib in expansion.libraries]


# --- the rule table -------------------------------------------------------------------------------


def test_rule_table() -> None:
    assert [(r.name, r.kind) for r in RUNTIME_LOADS] == [
        ("nss", LoadKind.NSS), ("libgcc_s", LoadKind.LIBRARY), ("gconv", LoadKind.GCONV),
    ]
    # NSS and gconv fire on traced paths only; libgcc_s on imported symbols only.
    assert (NSS.trigger_paths, NSS.trigger_symbols) == (("/etc/nsswitch.conf",), ())
    assert (GCONV.trigger_paths, GCONV.trigger_symbols) == (("*/gconv/*.so",), ())
    assert (LIBGCC_S.trigger_paths, LIBGCC_S.trigger_symbols) == ((), ("pthread_cancel", "pthread_exit"))
    assert nss_module_name("systemd") == "libnss_systemd.so.2"


# --- matching_trigger_path --------------------------------------------------------------------------


def test_matching_trigger_path_nss() -> None:
    assert matching_trigger_path(NSS, ["/etc/passwd", "/etc/nsswitch.conf", "/etc/group"]) == "/etc/nsswitch.conf"
    assert matching_trigger_path(NSS, ["/etc/passwd", "/etc/nsswitch.conf.bak", "/x/etc/nsswitch.conf"]) is None
    assert matching_trigger_path(NSS, []) is None


def test_matching_trigger_path_gconv() -> None:
    # A converter module in the trace, not the configuration glibc reads for setlocale().
    assert matching_trigger_path(GCONV, [f"{GCONV_DIR}/gconv-modules.cache", f"{GCONV_DIR}/gconv-modules"]) is None
    traced = [f"{GCONV_DIR}/gconv-modules.cache", f"{GCONV_DIR}/UTF-16.so", f"{GCONV_DIR}/ISO8859-1.so"]
    assert matching_trigger_path(GCONV, traced) == f"{GCONV_DIR}/UTF-16.so"    # the first one traced
    assert matching_trigger_path(GCONV, ["/opt/x/lib/gconv/CUSTOM.so"]) == "/opt/x/lib/gconv/CUSTOM.so"
    # fnmatch's '*' crosses '/': a module in a subdirectory of a gconv directory matches too.
    assert matching_trigger_path(GCONV, ["/usr/lib/gconv/sub/X.so"]) == "/usr/lib/gconv/sub/X.so"
    assert matching_trigger_path(GCONV, [f"{GCONV_DIR}/UTF-16.so.1", "/usr/lib/gconv.so", "/usr/lib/gconvX/Y.so"]) is None


def test_matching_trigger_path_of_a_symbol_rule_is_none() -> None:
    assert matching_trigger_path(LIBGCC_S, ["/lib/x86_64-linux-gnu/libgcc_s.so.1", "/etc/nsswitch.conf"]) is None


# --- parse_nsswitch -----------------------------------------------------------------------------


def test_parse_nsswitch_services_and_actions() -> None:
    text = (
        "# /etc/nsswitch.conf\n"
        "passwd:         files systemd\n"
        "hosts:  files mdns4_minimal [NOTFOUND=return] dns myhostname # trailing comment\n"
        "group:\tfiles [ SUCCESS=continue NOTFOUND=return ]\tsystemd\n"
        "shadow:files[!UNAVAIL=return]ldap\n"
        "   netgroup :   nis   \n"
        "no colon here\n"
        "#services: db files\n"
        "aliases:\n"
        "\n"
    )
    assert parse_nsswitch(text) == [
        ("passwd", "files"), ("passwd", "systemd"),
        ("hosts", "files"), ("hosts", "mdns4_minimal"), ("hosts", "dns"), ("hosts", "myhostname"),
        ("group", "files"), ("group", "systemd"),
        ("shadow", "files"), ("shadow", "ldap"),
        ("netgroup", "nis"),
    ]


def test_parse_nsswitch_edge_cases() -> None:
    assert parse_nsswitch("") == []
    assert parse_nsswitch("passwd: files\r\ngroup: sss\r\n") == [("passwd", "files"), ("group", "sss")]
    # Several action lists, and one at the end of the line.
    assert parse_nsswitch("hosts: a [NOTFOUND=return] [UNAVAIL=continue] b [TRYAGAIN=merge]\n") == [
        ("hosts", "a"), ("hosts", "b"),
    ]
    # A '#' anywhere starts a comment, even inside an action list.
    assert parse_nsswitch("hosts: a [NOTFOUND=return # ] b\npasswd: c\n") == [("hosts", "a"), ("passwd", "c")]
    # The same service twice is listed twice: the caller merges.
    assert parse_nsswitch("passwd: sss sss\n") == [("passwd", "sss"), ("passwd", "sss")]


# --- parse_gconv_modules ---------------------------------------------------------------------------


def test_parse_gconv_modules() -> None:
    text = (
        "# comment line\n"
        "alias\tISO-IR-100//\tISO-8859-1//\n"
        "module\tISO-8859-1//\tINTERNAL\tISO8859-1\t1\n"
        "module\tINTERNAL\tISO-8859-1//\tISO8859-1\t1\n"
        "module  UTF-16//  INTERNAL  UTF-16  # cost omitted, comment after\n"
        "module INTERNAL FOO// /opt/conv/FOO 2\n"
        "module TOO// FEW\n"
        "#module X// INTERNAL COMMENTED 1\n"
        "modules A// B// NOTAMODULE 1\n"
    )
    assert parse_gconv_modules(text) == ["ISO8859-1", "UTF-16", "/opt/conv/FOO"]
    assert parse_gconv_modules("") == []
    assert parse_gconv_modules("alias A// B//\n") == []


# --- NSS ----------------------------------------------------------------------------------------


def test_nss_modules_from_the_trees_nsswitch(tmp_path: Path) -> None:
    write(tmp_path, "/etc/nsswitch.conf", (
        "passwd: files systemd\n"
        "group:  files [NOTFOUND=return] systemd\n"
        "hosts:  files mdns4_minimal [NOTFOUND=return] dns\n"
        "netgroup: nis\n"
    ))
    expansion = expand(NSS, Root(str(tmp_path)), LIBDIR, TRIGGER)
    assert expansion == Expansion(
        configs=(nss_config(),),
        libraries=(
            # files and dns are inside libc; one module per service, naming every database using it.
            RuntimeFile("libnss_systemd.so.2", nss_reason("systemd", "passwd, group")),
            RuntimeFile("libnss_mdns4_minimal.so.2", nss_reason("mdns4_minimal", "hosts")),
            RuntimeFile("libnss_nis.so.2", nss_reason("nis", "netgroup")),
        ),
        notes=(),
    )


def test_nss_builtin_services_only(tmp_path: Path) -> None:
    write(tmp_path, "/etc/nsswitch.conf", "passwd: files\nhosts: files dns\n")
    expansion = expand(NSS, Root(str(tmp_path)), LIBDIR, "trig")
    assert expansion == Expansion((nss_config("trig"),), (), ())


def test_nss_without_nsswitch_conf(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    expansion = expand(NSS, Root(str(tmp_path)), LIBDIR, TRIGGER)
    assert expansion == Expansion((), (), ("/etc/nsswitch.conf not found: NSS uses only the services built into libc",))


def test_nss_nsswitch_conf_that_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "etc/nsswitch.conf").mkdir(parents=True)
    expansion = expand(NSS, Root(str(tmp_path)), LIBDIR, TRIGGER)
    assert (expansion.configs, expansion.libraries) == ((), ())
    assert expansion.notes == ("/etc/nsswitch.conf not found: NSS uses only the services built into libc",)


def test_nss_symlink_to_the_hosts_path_stays_in_the_tree(tmp_path: Path) -> None:
    # An absolute target restarts at the tree's root: /etc/nsswitch.conf -> /etc/nsswitch.conf is
    # a loop there, never the host's file (which names other services).
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/nsswitch.conf").symlink_to(NSSWITCH_CONF)
    expansion = expand(NSS, Root(str(root)), LIBDIR, TRIGGER)
    assert expansion == Expansion((), (), ("/etc/nsswitch.conf not found: NSS uses only the services built into libc",))


def test_nss_absolute_symlink_out_of_the_tree_is_read_inside_it(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = write(tmp_path, "/outside/nsswitch.conf", "passwd: files outsidemod\n")
    (root / "etc").mkdir(parents=True)
    # The host path of a file outside the tree: inside the tree, that path does not exist ...
    (root / "etc/nsswitch.conf").symlink_to(outside)
    assert expand(NSS, Root(str(root)), LIBDIR, TRIGGER).libraries == ()
    # ... until the tree has a file of its own there.
    write(root, str(outside), "passwd: files insidemod\n")
    expansion = expand(NSS, Root(str(root)), LIBDIR, TRIGGER)
    assert modules(expansion) == ["libnss_insidemod.so.2"]
    assert expansion.configs == (nss_config(),)


def test_nss_relative_symlink_climbing_out_is_clamped_at_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write(tmp_path, "/outside/nsswitch.conf", "passwd: files outsidemod\n")
    write(root, "/outside/nsswitch.conf", "passwd: files insidemod\n")
    (root / "etc").mkdir(parents=True)
    # On the host, root/etc/../../outside is tmp_path/outside; inside the tree '..' stops at '/'.
    (root / "etc/nsswitch.conf").symlink_to("../../../../../../outside/nsswitch.conf")
    assert modules(expand(NSS, Root(str(root)), LIBDIR, TRIGGER)) == ["libnss_insidemod.so.2"]


# --- gconv -------------------------------------------------------------------------------------


def gconv_reason(count: int, trigger: str) -> str:
    return f"{GCONV.why} ({count} modules); triggered by {trigger}"


def gconv_config(path: str, trigger: str) -> RuntimeFile:
    return RuntimeFile(path, f"iconv configuration; triggered by {trigger}")


def test_gconv_modules_from_every_configuration_file(tmp_path: Path) -> None:
    trigger = f"{GCONV_DIR}/UTF-16.so in the trace"
    write(tmp_path, f"{GCONV_DIR}/gconv-modules", (
        "alias ISO-IR-100// ISO-8859-1//\n"
        "module ISO-8859-1// INTERNAL ISO8859-1 1\n"
        "module INTERNAL ISO-8859-1// ISO8859-1 1\n"
        "module UTF-16// INTERNAL UTF-16 1\n"
    ))
    write(tmp_path, f"{GCONV_DIR}/gconv-modules.cache", b"\x00\x01binary digest naming modules UTF-7\x00")
    write(tmp_path, f"{GCONV_DIR}/gconv-modules.d/b-extra.conf", "module IBM1047// INTERNAL IBM1047 1\n")
    write(tmp_path, f"{GCONV_DIR}/gconv-modules.d/a-local.conf", (
        "module INTERNAL CUSTOM// /opt/conv/CUSTOM 1\n"
        "module UTF-16// INTERNAL UTF-16 1\n"
    ))
    write(tmp_path, f"{GCONV_DIR}/gconv-modules.d/README", "module X// INTERNAL NOTREAD 1\n")
    (tmp_path / GCONV_DIR.lstrip("/") / "gconv-modules.d" / "dir.conf").mkdir()
    expansion = expand(GCONV, Root(str(tmp_path)), LIBDIR, trigger)
    assert expansion.configs == tuple(gconv_config(p, trigger) for p in (
        f"{GCONV_DIR}/gconv-modules",
        f"{GCONV_DIR}/gconv-modules.cache",        # read by glibc, names no module here
        f"{GCONV_DIR}/gconv-modules.d/a-local.conf",
        f"{GCONV_DIR}/gconv-modules.d/b-extra.conf",
    ))
    reason = gconv_reason(4, trigger)
    assert expansion.libraries == tuple(RuntimeFile(p, reason) for p in (
        f"{GCONV_DIR}/ISO8859-1.so",
        f"{GCONV_DIR}/UTF-16.so",
        "/opt/conv/CUSTOM.so",                      # an absolute module path is kept
        f"{GCONV_DIR}/IBM1047.so",
    ))
    assert expansion.notes == ()


def test_gconv_libdir_decides_where_to_look(tmp_path: Path) -> None:
    write(tmp_path, "/usr/lib64/gconv/gconv-modules", "module A// INTERNAL AMOD 1\n")
    write(tmp_path, f"{GCONV_DIR}/gconv-modules", "module B// INTERNAL BMOD 1\n")
    assert modules(expand(GCONV, Root(str(tmp_path)), "/usr/lib64", "t")) == ["/usr/lib64/gconv/AMOD.so"]
    assert modules(expand(GCONV, Root(str(tmp_path)), LIBDIR, "t")) == [f"{GCONV_DIR}/BMOD.so"]


def test_gconv_only_a_cache_names_no_modules(tmp_path: Path) -> None:
    write(tmp_path, f"{GCONV_DIR}/gconv-modules.cache", b"\x00binary\x00")
    expansion = expand(GCONV, Root(str(tmp_path)), LIBDIR, "t")
    assert expansion == Expansion(
        (gconv_config(f"{GCONV_DIR}/gconv-modules.cache", "t"),), (),
        (f"no gconv modules configured under {GCONV_DIR}",),
    )


def test_gconv_without_configuration(tmp_path: Path) -> None:
    (tmp_path / "usr/lib").mkdir(parents=True)
    expansion = expand(GCONV, Root(str(tmp_path)), LIBDIR, "t")
    assert expansion == Expansion((), (), (f"no gconv modules configured under {GCONV_DIR}",))


def test_gconv_configuration_through_symlinks_stays_in_the_tree(tmp_path: Path) -> None:
    root = tmp_path / "root"
    # The host's path of a file outside the tree, and an absolute link inside it.
    outside = write(tmp_path, "/outside/gconv-modules", "module A// INTERNAL OUTSIDE 1\n")
    (root / GCONV_DIR.lstrip("/")).mkdir(parents=True)
    (root / GCONV_DIR.lstrip("/") / "gconv-modules").symlink_to(outside)
    expansion = expand(GCONV, Root(str(root)), LIBDIR, "t")
    assert (expansion.configs, expansion.libraries) == ((), ())
    write(root, "/etc/gconv-modules", "module A// INTERNAL INSIDE 1\n")
    (root / GCONV_DIR.lstrip("/") / "gconv-modules").unlink()
    (root / GCONV_DIR.lstrip("/") / "gconv-modules").symlink_to("/etc/gconv-modules")
    expansion = expand(GCONV, Root(str(root)), LIBDIR, "t")
    assert modules(expansion) == [f"{GCONV_DIR}/INSIDE.so"]
    # The configuration keeps the spelling glibc opens.
    assert [c.path for c in expansion.configs] == [f"{GCONV_DIR}/gconv-modules"]


# --- fixed libraries ------------------------------------------------------------------------------


def test_library_rule(tmp_path: Path) -> None:
    trigger = "pthread_cancel() imported by /app/prog"
    expansion = expand(LIBGCC_S, Root(str(tmp_path)), LIBDIR, trigger)
    assert expansion == Expansion((), (RuntimeFile("libgcc_s.so.1", f"{LIBGCC_S.why}; triggered by {trigger}"),), ())


def test_library_rule_of_several_names(tmp_path: Path) -> None:
    rule = RuntimeLoad("demo", LoadKind.LIBRARY, "loads two", trigger_symbols=("f",), libraries=("liba.so.1", "libb.so.2"))
    assert expand(rule, Root(str(tmp_path)), LIBDIR, "t") == Expansion(
        (), (RuntimeFile("liba.so.1", "loads two; triggered by t"), RuntimeFile("libb.so.2", "loads two; triggered by t")),
    )


@pytest.mark.parametrize("kind", [LoadKind.NSS, LoadKind.GCONV])
def test_expansion_reads_nothing_outside_the_tree(tmp_path: Path, kind: LoadKind) -> None:
    # An empty tree: the host's /etc/nsswitch.conf and gconv files must not be seen.
    rule = NSS if kind is LoadKind.NSS else GCONV
    expansion = expand(rule, Root(str(tmp_path)), LIBDIR, "t")
    assert (expansion.configs, expansion.libraries) == ((), ())
    assert len(expansion.notes) == 1
