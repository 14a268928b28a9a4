"""Templates that cannot hurt: duplicate ids, size/depth/count limits, bounded
numbers, shell syntax, and `p3s dag import` refusing each with exit 2 and the
database unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from p3s.cli import EXIT_OK, EXIT_USAGE, main
from p3s.dagengine import TemplateLimits, parse_graphml
from p3s.errors import TemplateError
from tests.unit.test_templates import NS, TEMPLATES_DIR, graphml, refused

WEEK = 7 * 24 * 3600


def node_xml(name: str, command: str = "true") -> str:
    return f'<node id="{name}"><data key="n_command">{command}</data></node>'


def document(body: str, keys: str = "") -> str:
    """A template around `body` (nodes and edges), with the usual keys declared."""
    return (
        f"<graphml {NS}>"
        '<key id="g_trigger" for="graph" attr.name="trigger" attr.type="string"/>'
        '<key id="g_budget" for="graph" attr.name="budget_s" attr.type="string"/>'
        '<key id="n_command" for="node" attr.name="command" attr.type="string"/>'
        '<key id="n_priority" for="node" attr.name="priority" attr.type="string"/>'
        f"{keys}"
        '<graph edgedefault="directed"><data key="g_trigger">*</data><data key="g_budget">300</data>'
        f"{body}</graph></graphml>"
    )


# -- duplicate ids -----------------------------------------------------------------------


def test_duplicate_node_id_is_refused_naming_it() -> None:
    doc = document(
        '<node id="a"><data key="n_command">rm -rf {outdir}/x</data></node>'
        '<node id="a"><data key="n_priority">9</data></node>'
    )
    msg = refused(doc.replace("<graphml", "<graphml", 1), "'a'", "twice")
    assert "node" in msg


def test_duplicate_edge_id_is_refused_naming_it() -> None:
    doc = document(
        node_xml("a") + node_xml("b") + node_xml("c")
        + '<edge id="e1" source="a" target="b"/><edge id="e1" source="b" target="c"/>'
    )
    refused(doc, "edge id 'e1'", "twice")


def test_the_same_edge_twice_is_refused_naming_both_ends() -> None:
    doc = document(node_xml("a") + node_xml("b") + '<edge source="a" target="b"/><edge source="a" target="b"/>')
    refused(doc, "'a' -> 'b'", "twice")


def test_a_second_graph_is_refused() -> None:
    # networkx reads the first graph and silently ignores any other.
    doc = document(node_xml("a")).replace(
        "</graph></graphml>", '</graph><graph edgedefault="directed">' + node_xml("b") + "</graph></graphml>"
    )
    refused(doc, "one graph")


# -- size, depth and count, checked while scanning ---------------------------------------


def test_document_nested_100000_deep_is_refused_cleanly() -> None:
    depth = 100_000
    doc = document(node_xml("a") + "<desc>" * depth + "</desc>" * depth)
    msg = refused(doc, "deeper than", str(TemplateLimits().max_depth))
    assert len(msg) < 300


def test_depth_limit_is_a_setting() -> None:
    doc = document(node_xml("a"))
    parse_graphml(doc, name="t", limits=TemplateLimits(max_depth=4))
    with pytest.raises(TemplateError, match="deeper than 3"):
        parse_graphml(doc, name="t", limits=TemplateLimits(max_depth=3))


def test_size_limit_refuses_a_document_just_over_it() -> None:
    limits = TemplateLimits(max_bytes=10_000)
    small = document(node_xml("a"))
    padding = "<!--" + "x" * (limits.max_bytes - len(small) - 7) + "-->"
    at_limit = small.replace("<graph ", padding + "<graph ", 1)
    assert len(at_limit.encode()) <= limits.max_bytes
    parse_graphml(at_limit, name="t", limits=limits)
    over = at_limit.replace("<!--", "<!--xx", 1)
    assert len(over.encode()) == limits.max_bytes + 2
    with pytest.raises(TemplateError, match=r"larger than 10000 bytes"):
        parse_graphml(over, name="t", limits=limits)
    with pytest.raises(TemplateError, match=r"larger than 10000 bytes"):
        parse_graphml(over.encode(), name="t", limits=limits)


def test_a_50_mb_template_of_100000_nodes_is_refused_by_its_size() -> None:
    body = "".join(node_xml(f"n{i:06d}", "sha256sum {input} " + "x" * 440) for i in range(100_000))
    doc = document(body).encode()
    assert len(doc) > 50_000_000
    with pytest.raises(TemplateError, match="larger than 5000000 bytes"):
        parse_graphml(doc, name="big")


def test_node_count_limit() -> None:
    doc = document("".join(node_xml(f"n{i}") for i in range(11)))
    assert len(parse_graphml(doc, name="t", limits=TemplateLimits(max_nodes=11)).nodes) == 11
    with pytest.raises(TemplateError, match="more than 10 nodes"):
        parse_graphml(doc, name="t", limits=TemplateLimits(max_nodes=10))


def test_default_node_count_limit_is_2000() -> None:
    doc = document("".join(node_xml(f"n{i}") for i in range(2001)))
    refused(doc, "more than 2000 nodes")


def test_edge_count_limit() -> None:
    nodes = "".join(node_xml(f"n{i}") for i in range(6))
    edges = "".join(f'<edge source="n{i}" target="n{i + 1}"/>' for i in range(5))
    parse_graphml(document(nodes + edges), name="t", limits=TemplateLimits(max_edges=5))
    with pytest.raises(TemplateError, match="more than 4 edges"):
        parse_graphml(document(nodes + edges), name="t", limits=TemplateLimits(max_edges=4))


BILLION_LAUGHS = (
    '<?xml version="1.0"?>\n<!DOCTYPE lolz [\n <!ENTITY lol "lol">\n'
    + "".join(f' <!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">\n' for i in range(1, 10))
    + "]>\n"
)


@pytest.mark.parametrize(
    "prolog",
    [
        BILLION_LAUGHS,
        '<?xml version="1.0"?>\n<!DOCTYPE graphml SYSTEM "file:///etc/passwd">\n',
        '<!DOCTYPE graphml [<!ENTITY x "y">]>',
        "<!DOCTYPE graphml>",
    ],
    ids=["billion-laughs", "external", "entity", "bare"],
)
def test_a_doctype_is_refused(prolog: str) -> None:
    doc = prolog + document(node_xml("a", "echo &lol9;" if "lol9" in prolog else "true"))
    refused(doc, "DOCTYPE")


# -- numbers with upper bounds -----------------------------------------------------------


@pytest.mark.parametrize(
    ("attr", "value", "fragment"),
    [
        ("wall_s", str(WEEK + 1), "604800"),
        ("wall_s", "1e300", "604800"),
        ("wall_s", "inf", "'wall_s'"),
        ("wall_s", "nan", "'wall_s'"),
        ("wall_s", "-inf", "'wall_s'"),
        ("expected_s", "1e300", "604800"),
        ("expected_s", "nan", "'expected_s'"),
        ("max_running", "1000000", "10000"),
        ("max_running", "1e300", "'max_running'"),
        ("priority", "10", "0 to 9"),
        ("priority", "1e300", "'priority'"),
    ],
)
def test_numbers_over_their_bound_are_refused_naming_node_and_attribute(attr: str, value: str, fragment: str) -> None:
    doc = graphml({"reco": {"command": "true", attr: value}})
    refused(doc, "node 'reco'", f"'{attr}'", fragment)


@pytest.mark.parametrize("value", ["1e300", "inf", "nan", str(WEEK + 1)])
def test_graph_budget_over_its_bound_is_refused(value: str) -> None:
    doc = graphml({"a": {"command": "true"}}, graph={"name": "t", "trigger": "*", "budget_s": value})
    refused(doc, "graph", "'budget_s'")


def test_node_budget_is_bounded_too() -> None:
    graph = {"name": "t", "trigger": "*", "budget_s": "1e300"}
    doc = graphml({"a": {"command": "true", "budget_s": "1e300"}}, graph=graph)
    refused(doc, "'budget_s'")


def test_a_week_is_accepted_and_the_bound_is_a_setting() -> None:
    doc = graphml({"a": {"command": "true", "wall_s": str(WEEK), "expected_s": str(WEEK)}})
    assert parse_graphml(doc).node("a").wall_s == WEEK
    with pytest.raises(TemplateError, match="node 'a': attribute 'wall_s'.*at most 3600"):
        parse_graphml(doc, limits=TemplateLimits(max_wall_s=3600))


# -- shell syntax ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "construct"),
    [
        ("sha256sum {input} > {outdir}/sum.txt", "'>'"),
        ("decode {input} 2>{outdir}/err.log", "'>'"),
        ("decode < {input}", "'<'"),
        ("decode {input} | gzip", "'|'"),
        ("decode {input}; touch {outdir}/done", "';'"),
        ("decode {input} && touch {outdir}/done", "'&&'"),
        ("decode {input} || true", "'||'"),
        ("decode {input} &", "'&'"),
        ("(decode {input})", "'('"),
        ("decode --home $HOME {input}", "'$HOME'"),
        ("decode --home ${HOME} {input}", "'${HOME}'"),
        ('decode --home "$HOME" {input}', "'$HOME'"),
        ("decode --date $(date +%s) {input}", "'$('"),
        ("decode --date `date` {input}", "'`'"),
        ('decode --date "`date`" {input}', "'`'"),
        ("ls {outdir}/*.png", "'*'"),
        ("ls {outdir}/run?.png", "'?'"),
        ("ls {outdir}/run[0-9].png", "'['"),
        ("cp {input} ~/backup", "'~'"),
        ("decode {input} # keep going", "'#'"),
        ("OMP_NUM_THREADS=1 decode {input}", "'OMP_NUM_THREADS='"),
        ("decode {input}\ntouch {outdir}/done", "newline"),
    ],
)
def test_shell_syntax_outside_quotes_is_refused_with_the_way_to_ask_for_a_shell(command: str, construct: str) -> None:
    doc = graphml({"reco": {"command": command.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")}})
    msg = refused(doc, "node 'reco'", "'command'", construct, "/bin/sh -c '...'")
    assert "\n" not in msg


@pytest.mark.parametrize(
    "command",
    [
        "/bin/sh -c 'sha256sum \"$1\" > \"$2\"/sum.txt' sh {input} {outdir}",
        "bash -c 'decode \"$0\" | gzip > out.gz && echo $HOME' {input}",
        'bash -ec "decode \\"$1\\" > $2/log" bash {input} {outdir}',
        "/usr/bin/bash -o pipefail -c 'a | b' {input}",
        "grep -e '<a & \"b\">' {input}",
        "awk '{print $1}' {input}",
        "find {outdir} -name '*.png'",
        "echo 'it''s' \\$HOME \\> \\*",
        "printf '%s\\n' \"a;b|c\" {input}",
        "decode --opt=a=b {input}",
        "decode {input} -- -x",
        "[ -f {input} ]",
        "decode {input}\n",
        "  decode {input}  ",
        "curl 'root://eos//a?b=c' {input}",
        "echo a$ b",
    ],
)
def test_quoted_or_escaped_shell_text_is_accepted(command: str) -> None:
    doc = graphml({"reco": {"command": command.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")}})
    parse_graphml(doc)


def test_placeholder_inside_a_shell_script_is_refused() -> None:
    # A file name expanded into the script text would be run by the shell: pass it as an argument.
    doc = graphml({"reco": {"command": "/bin/sh -c 'sha256sum {input}'"}})
    refused(doc, "node 'reco'", "'command'", "{input}", "$1")


def test_a_shell_operator_after_the_shell_script_is_refused() -> None:
    doc = graphml({"reco": {"command": "/bin/sh -c 'decode \"$1\"' sh {input} &gt; out.log"}})
    refused(doc, "node 'reco'", "'>'")


def test_shipped_templates_pass_the_rules() -> None:
    for path in sorted(TEMPLATES_DIR.glob("*.graphml")):
        parse_graphml(path.read_bytes(), limits=TemplateLimits())


def test_stored_snapshots_are_not_judged_by_the_import_rules() -> None:
    # A workflow keeps the snapshot it was made from: a rule added later must not make it unreadable.
    from p3s.dagengine import Node, Template

    t = Template(name="t", trigger="*", budget_s=10, nodes=(Node(name="a", command="echo a > b", wall_s=1e9),))
    assert Template.from_dict(json.loads(json.dumps(t.to_dict()))) == t


def test_limits_and_settings_have_the_same_fields() -> None:
    import dataclasses

    from p3s.config import TemplatesSettings

    assert dataclasses.asdict(TemplatesSettings()) == dataclasses.asdict(TemplateLimits())


# -- p3s dag import: exit 2, one line, the database unchanged ------------------------------


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in [k for k in __import__("os").environ if k.startswith("P3S_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("P3S_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("P3S_TEMPLATES_MAX_BYTES", "20000")
    return tmp_path


def dag_list(capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    capsys.readouterr()
    assert main(["dag", "list", "--all", "--json"]) == EXIT_OK
    return json.loads(capsys.readouterr().out)


REFUSED_IMPORTS = {
    "duplicate-node": document(node_xml("a") + node_xml("a")),
    "deep": document(node_xml("a") + "<desc>" * 100_000 + "</desc>" * 100_000),
    "over-size": document(node_xml("a", "true " + "x" * 20_000)),
    "billion-laughs": BILLION_LAUGHS + document(node_xml("a", "echo &lol9;")),
    "wall-1e300": document(
        '<node id="a"><data key="n_command">true</data><data key="n_wall">1e300</data></node>',
        keys='<key id="n_wall" for="node" attr.name="wall_s" attr.type="string"/>',
    ),
    "shell": document(node_xml("a", "decode {input} &gt; out.txt")),
}


@pytest.mark.parametrize("case", sorted(REFUSED_IMPORTS))
def test_dag_import_refuses_with_exit_2_one_line_and_the_database_unchanged(
    case: str, state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = state / "monitor.graphml"
    good.write_bytes((TEMPLATES_DIR / "monitor.graphml").read_bytes())
    assert main(["dag", "import", str(good)]) == EXIT_OK
    before = dag_list(capsys)
    assert [r["name"] for r in before] == ["monitor"]

    bad = state / f"{case}.graphml"
    bad.write_text(REFUSED_IMPORTS[case])
    capsys.readouterr()
    assert main(["dag", "import", str(bad), "--name", "monitor"]) == EXIT_USAGE
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("p3s: "), err
    assert "Traceback" not in err
    assert dag_list(capsys) == before


def test_dag_import_of_a_missing_file_is_one_clear_line(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = state / "nosuch.graphml"
    assert main(["dag", "import", str(missing)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.splitlines() == [f"p3s: cannot read template file {missing}: No such file or directory"]


def test_dag_import_of_a_huge_file_reads_no_more_than_the_limit(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    big = state / "big.graphml"
    with big.open("wb") as fh:
        fh.truncate(10**11)  # sparse: 100 GB that is never read whole
    assert main(["dag", "import", str(big)]) == EXIT_USAGE
    assert "larger than 20000 bytes" in capsys.readouterr().err
