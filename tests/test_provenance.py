"""Why every node of the image is there (provenance.py): the file set's typed reasons rendered,
and the entries build writes itself explained like any other. explain and inspect on real
recordings are in test_inspection.py; their agreement with build on every sample workload in
test_e2e.py."""
from __future__ import annotations

from pathlib import Path

from tracejail import build as tjbuild
from tracejail import fileset
from tracejail import provenance as prov
from tracejail import trace as tr


def test_typed_reasons_render_with_their_facts() -> None:
    K, R = fileset.Kind, fileset.Reason
    r = prov.render(R(K.NEEDED, name="libz.so.1", needed_by="/a/b.so", rule="runpath", via_origin=True,
                      search="$ORIGIN/../lib"))
    assert (r.kind, r.data["rule"], r.data["via_origin"], r.data["needed_by"], r.data["search_path"]) == (
        prov.NEEDED, "runpath", True, ["/a/b.so"], "$ORIGIN/../lib")
    r = prov.render(R(K.NEEDED, name="libnss_x.so.2", needed_by="/lib/libc.so.6", rule="runtime:nss",
                      detail="glibc's NSS (a, b): x"))
    assert r.kind == prov.RUNTIME and r.data["why"].startswith("glibc's NSS (a, b)")
    assert prov.render(R(K.NEEDED, name="/lib64/ld-linux-x86-64.so.2", needed_by="/bin/ls", rule="interp")).kind \
        == prov.INTERP
    assert prov.render(R(K.NEEDED, name="/bin/sh", needed_by="/x.sh", rule="shebang")).kind == prov.SCRIPT
    assert prov.render(R(K.TRACED, accesses=("exec", "read"))).data["access"] == ["exec", "read"]
    assert prov.render(R(K.INCLUDE)).kind == prov.INCLUDE
    assert prov.render(R(K.DIST_INFO)).kind == prov.DIST_INFO
    assert prov.render(R(K.PATH_PREFIX, path="/a/../b")).kind == prov.DOTDOT
    made = prov.render(R(K.RUN_DIRECTORY, path="/srv/site"))
    assert made.kind == prov.RUN_DIR and "created /srv/site" in made.text
    # every kind the file set states has a sentence of its own
    assert all(prov.render(R(k, path="/p", name="n")).kind != prov.OTHER for k in K)
    merged = prov.merge_needed([prov.render(R(K.NEEDED, name="libc.so.6", needed_by="/a", rule="ld.so.cache")),
                                prov.render(R(K.NEEDED, name="libc.so.6", needed_by="/b", rule="ld.so.cache"))])
    assert len(merged) == 1 and merged[0].data["needed_by"] == ["/a", "/b"]
    assert "ld.so cache" in merged[0].text


def test_what_build_writes_is_explained_as_in_the_image(tmp_path: Path) -> None:
    """passwd, group, nsswitch.conf, /tmp and the image user's home are planned with their reason,
    so explain says why they are there before any build (and agrees with the build after it)."""
    from tracejail.record import RecordOptions, record

    rec = record(["true"], RecordOptions(passthrough=False))
    trace_path = tmp_path / "t.json"
    tr.save(rec.trace, str(trace_path))
    with prov.selected(str(trace_path), tjbuild.BuildOptions(package_metadata=False)) as sel:
        pv = prov.compute(sel.trace, sel.files, sel.plan, sel.root)
        for path in ("/etc/passwd", "/etc/group", "/etc/nsswitch.conf", "/tmp", "/home/nonroot"):
            ex = prov.explain(path, pv, sel.files, sel.plan)
            assert ex.in_image and ex.status == "generated", (path, ex.summary)
            assert any(r.kind == prov.GENERATED and "tracejail build" in r.text for r in ex.reasons), path
        built = tjbuild.build(str(trace_path), tjbuild.BuildOptions(output=str(tmp_path / "i.tar"), load=False,
                                                                    package_metadata=False))
        assert set(built.plan.entries) == set(sel.plan.entries)
