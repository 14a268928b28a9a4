"""GraphML templates: parse, validate, export, expand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from p3s.dagengine import (
    PLACEHOLDERS,
    Node,
    Template,
    expand,
    expand_env,
    parse_graphml,
    to_dot,
    to_graphml,
    to_mermaid,
)
from p3s.errors import TemplateError

TEMPLATES_DIR = Path(__file__).parents[2] / "config" / "templates"
TEMPLATE_FILES = sorted(TEMPLATES_DIR.glob("*.graphml"))

NS = 'xmlns="http://graphml.graphdrawing.org/xmlns"'


def graphml(
    nodes: dict[str, dict[str, str]],
    edges: list[tuple[str, str]] = (),  # type: ignore[assignment]
    graph: dict[str, str] | None = None,
    edgedefault: str = "directed",
    types: dict[str, str] | None = None,
) -> str:
    """A GraphML document with every attribute declared as a string unless `types` says."""
    graph = (
        {"name": "t", "trigger": "*.hdf5", "budget_s": "300"}
        if graph is None
        else graph
    )
    types = types or {}
    node_attrs = sorted({a for attrs in nodes.values() for a in attrs})
    keys = [
        f'<key id="g_{a}" for="graph" attr.name="{a}" attr.type="string"/>'
        for a in graph
    ] + [
        f'<key id="n_{a}" for="node" attr.name="{a}" attr.type="{types.get(a, "string")}"/>'
        for a in node_attrs
    ]
    body = [f'<data key="g_{a}">{v}</data>' for a, v in graph.items()]
    for name, attrs in nodes.items():
        data = "".join(f'<data key="n_{a}">{v}</data>' for a, v in attrs.items())
        body.append(f'<node id="{name}">{data}</node>')
    body += [f'<edge source="{s}" target="{t}"/>' for s, t in edges]
    return (
        f'<graphml {NS}>{"".join(keys)}<graph edgedefault="{edgedefault}">'
        f"{''.join(body)}</graph></graphml>"
    )


def refused(doc: str | bytes, *fragments: str) -> str:
    with pytest.raises(TemplateError) as info:
        parse_graphml(doc)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# -- the shipped examples ------------------------------------------------------


def test_examples_exist() -> None:
    names = {p.name for p in TEMPLATE_FILES}
    assert {"monitor.graphml", "tpc_dqm.graphml", "multi_root.graphml"} <= names


@pytest.mark.parametrize("path", TEMPLATE_FILES, ids=lambda p: p.name)
def test_example_round_trips(path: Path) -> None:
    t = parse_graphml(path.read_bytes())
    assert t.name == path.stem
    again = parse_graphml(to_graphml(t))
    assert again == t
    # The export carries every attribute, not just the shape.
    assert [n.__dict__ for n in again.nodes] == [n.__dict__ for n in t.nodes]
    snapshot = json.loads(json.dumps(t.to_dict()))
    assert Template.from_dict(snapshot) == t


def test_tpc_dqm_content() -> None:
    t = parse_graphml((TEMPLATES_DIR / "tpc_dqm.graphml").read_text())
    assert t.trigger == "np04_raw_run*.hdf5"
    assert t.roots() == ("decoder",)
    assert t.children("decoder") == ("event_display", "purity", "tpc_monitor")
    assert t.parents("summary") == ("event_display", "purity", "tpc_monitor")
    assert t.descendants("decoder") == {
        "event_display",
        "purity",
        "tpc_monitor",
        "summary",
    }
    assert t.descendants("summary") == frozenset()
    assert t.nodes[0].name == "decoder" and t.nodes[-1].name == "summary"
    assert t.node("tpc_monitor").env["OMP_NUM_THREADS"] == "1"
    assert t.node("tpc_monitor").expected_s == 30.0
    assert t.node("event_display").max_running == 2
    assert t.node("decoder").stage_in is True and t.node("decoder").budget_s == 240.0
    assert t.node("summary").argv == ("ls", "-l", "{parent_outdirs}")
    pm = t.parents_map()
    assert list(pm) == [n.name for n in t.nodes]
    assert pm["decoder"] == () and pm["purity"] == ("decoder",)


def test_multi_root_has_two_roots() -> None:
    t = parse_graphml((TEMPLATES_DIR / "multi_root.graphml").read_text())
    assert set(t.roots()) == {"beam_check", "tpc_noise"}
    assert t.parents("combined_report") == ("beam_check", "tpc_noise")


def test_node_lookup_of_unknown_name_is_a_template_error() -> None:
    t = parse_graphml((TEMPLATES_DIR / "monitor.graphml").read_text())
    with pytest.raises(TemplateError, match="'nosuch'"):
        t.node("nosuch")
    with pytest.raises(TemplateError, match="'nosuch'"):
        t.parents("nosuch")


def test_with_name_and_name_argument() -> None:
    text = (TEMPLATES_DIR / "monitor.graphml").read_text()
    t = parse_graphml(text, name="monitor_v2")
    assert t.name == "monitor_v2"
    assert t == parse_graphml(text).with_name("monitor_v2")


# -- accepted variants ---------------------------------------------------------


def test_typed_and_string_values_parse_alike() -> None:
    attrs = {
        "command": "wc -c {input}",
        "priority": "7",
        "wall_s": "2.5",
        "stage_in": "true",
    }
    as_strings = parse_graphml(graphml({"a": attrs}))
    typed = parse_graphml(
        graphml(
            {"a": {**attrs, "stage_in": "true"}},
            types={"priority": "int", "wall_s": "double", "stage_in": "boolean"},
        )
    )
    assert as_strings == typed
    node = typed.node("a")
    assert (node.priority, node.wall_s, node.stage_in) == (7, 2.5, True)


def test_defaults() -> None:
    node = parse_graphml(graphml({"a": {"command": "true"}})).node("a")
    assert node == Node(name="a", command="true")
    assert (node.priority, node.wall_s, node.queue, dict(node.env)) == (
        5,
        3600.0,
        "default",
        {},
    )
    assert node.budget_s is node.expected_s is node.max_running is None
    assert node.stage_in is False


def test_label_and_description_are_ignored() -> None:
    t = parse_graphml(
        graphml({"a": {"command": "true", "label": "A", "description": "x"}})
    )
    assert t.node("a") == Node(name="a", command="true")


def test_parallel_edges_are_refused_not_merged() -> None:
    doc = graphml(
        {"a": {"command": "true"}, "b": {"command": "true"}}, [("a", "b"), ("a", "b")]
    )
    refused(doc, "edge 'a' -> 'b'", "twice")


def test_edge_ids_are_accepted_and_ignored() -> None:
    doc = graphml({"a": {"command": "true"}, "b": {"command": "true"}}, [("a", "b")])
    doc = doc.replace('<edge source="a"', '<edge id="e0" source="a"')
    assert parse_graphml(doc).edges == (("a", "b"),)


def test_other_brace_text_is_not_a_placeholder() -> None:
    t = parse_graphml(
        graphml({"a": {"command": "awk '{print $1}' '${HOME}' {A} {input}"}})
    )
    assert t.node("a").argv == ("awk", "{print $1}", "${HOME}", "{A}", "{input}")


def test_bytes_input() -> None:
    doc = graphml({"a": {"command": "true"}}).encode()
    assert parse_graphml(doc).node("a").command == "true"


# -- refusals: one per kind of bad input ---------------------------------------


def test_refuses_non_xml() -> None:
    msg = refused("this is not xml", "not a GraphML document")
    assert msg.startswith("not a GraphML document")


def test_refuses_xml_that_is_not_graphml() -> None:
    assert refused("<html><body/></html>").startswith("not a GraphML document")


def test_refuses_graphml_without_its_namespace() -> None:
    msg = refused('<graphml><graph edgedefault="directed"><node id="a"/></graph></graphml>')
    assert "lacks the GraphML namespace" in msg and "http://graphml.graphdrawing.org/xmlns" in msg


def test_refuses_undirected() -> None:
    refused(graphml({"a": {"command": "true"}}, edgedefault="undirected"), "undirected")


def test_refuses_cycle() -> None:
    doc = graphml(
        {"a": {"command": "true"}, "b": {"command": "true"}, "c": {"command": "true"}},
        [("a", "b"), ("b", "a"), ("b", "c")],
    )
    msg = refused(doc, "cycle")
    assert "a -> b -> a" in msg or "b -> a -> b" in msg


def test_refuses_self_loop() -> None:
    refused(graphml({"a": {"command": "true"}}, [("a", "a")]), "cycle", "a -> a")


def test_refuses_missing_command() -> None:
    refused(graphml({"monitor": {"priority": "5"}}), "node 'monitor'", "'command'")


@pytest.mark.parametrize(
    ("attr", "value", "types"),
    [
        ("priority", "high", {}),
        ("priority", "12", {}),
        ("priority", "-1", {}),
        ("priority", "5.5", {"priority": "double"}),
        ("priority", "true", {"priority": "boolean"}),
        ("wall_s", "0", {}),
        ("wall_s", "soon", {}),
        ("wall_s", "nan", {}),
        ("queue", "bad queue!", {}),
        ("budget_s", "-3", {}),
        ("expected_s", "-1", {}),
        ("max_running", "0", {}),
        ("max_running", "two", {}),
        ("stage_in", "maybe", {}),
        ("stage_in", "1", {"stage_in": "int"}),
    ],
)
def test_refuses_bad_value(attr: str, value: str, types: dict[str, str]) -> None:
    doc = graphml({"monitor": {"command": "true", attr: value}}, types=types)
    refused(doc, "node 'monitor'", f"'{attr}'")


def test_priority_message_is_exact() -> None:
    doc = graphml({"monitor": {"command": "true", "priority": "high"}})
    assert refused(doc) == (
        "node 'monitor': attribute 'priority' must be an integer from 0 to 9, got 'high'"
    )


def test_typed_value_that_does_not_parse_names_the_node() -> None:
    doc = graphml(
        {"monitor": {"command": "true", "priority": "high"}}, types={"priority": "int"}
    )
    refused(doc, "node 'monitor'", "'priority'", "'high'")


def test_refuses_unknown_attribute_and_lists_allowed() -> None:
    doc = graphml({"monitor": {"command": "true", "priorty": "5"}})
    refused(doc, "node 'monitor'", "'priorty'", "priority", "wall_s", "queue")


def test_refuses_unknown_graph_attribute() -> None:
    doc = graphml(
        {"a": {"command": "true"}},
        graph={"name": "t", "trigger": "*", "budget_s": "9", "budgett_s": "9"},
    )
    refused(doc, "'budgett_s'", "trigger")


def test_refuses_unknown_edge_attribute() -> None:
    doc = (
        f'<graphml {NS}><key id="w" for="edge" attr.name="weight" attr.type="string"/>'
        '<key id="c" for="node" attr.name="command" attr.type="string"/>'
        '<key id="t" for="graph" attr.name="trigger" attr.type="string"/>'
        '<key id="b" for="graph" attr.name="budget_s" attr.type="string"/>'
        '<graph edgedefault="directed"><data key="t">*</data><data key="b">9</data>'
        '<node id="a"><data key="c">true</data></node><node id="b"><data key="c">true</data></node>'
        '<edge source="a" target="b"><data key="w">1</data></edge></graph></graphml>'
    )
    with pytest.raises(TemplateError, match=r"edge 'a' -> 'b'.*'weight'"):
        parse_graphml(doc, name="t")


@pytest.mark.parametrize(
    "env",
    [
        "not json",
        '["A", "B"]',
        '{"A": 1}',
        '{"A": ["x"]}',
        '{"1BAD": "x"}',
    ],
)
def test_refuses_bad_env(env: str) -> None:
    refused(
        graphml({"monitor": {"command": "true", "env": env}}), "node 'monitor'", "'env'"
    )


def test_refuses_missing_trigger() -> None:
    doc = graphml({"a": {"command": "true"}}, graph={"name": "t", "budget_s": "9"})
    refused(doc, "'trigger'")


def test_refuses_missing_budget() -> None:
    doc = graphml({"a": {"command": "true"}}, graph={"name": "t", "trigger": "*"})
    refused(doc, "'budget_s'")


def test_refuses_bad_graph_budget() -> None:
    doc = graphml(
        {"a": {"command": "true"}}, graph={"name": "t", "trigger": "*", "budget_s": "0"}
    )
    refused(doc, "graph", "'budget_s'")


def test_refuses_missing_name() -> None:
    doc = graphml({"a": {"command": "true"}}, graph={"trigger": "*", "budget_s": "9"})
    refused(doc, "name")
    assert parse_graphml(doc, name="given").name == "given"


def test_refuses_unknown_placeholder_in_command() -> None:
    doc = graphml({"monitor": {"command": "cp {input} {outputdir}"}})
    refused(doc, "node 'monitor'", "'command'", "{outputdir}")


def test_refuses_unknown_placeholder_in_env() -> None:
    env = '{"OUT": "{out_dir}"}'
    refused(
        graphml({"monitor": {"command": "true", "env": env}}),
        "node 'monitor'",
        "'env'",
        "{out_dir}",
    )


@pytest.mark.parametrize("command", ["", "   ", "echo 'unbalanced"])
def test_refuses_bad_command(command: str) -> None:
    refused(graphml({"monitor": {"command": command}}), "node 'monitor'", "'command'")


def test_refuses_node_budget_over_graph_budget() -> None:
    doc = graphml({"monitor": {"command": "true", "budget_s": "301"}})
    refused(doc, "node 'monitor'", "'budget_s'", "300")
    # Equal to the graph's budget is fine.
    assert (
        parse_graphml(graphml({"m": {"command": "true", "budget_s": "300"}}))
        .node("m")
        .budget_s
        == 300
    )


def test_refuses_no_nodes() -> None:
    refused(graphml({}), "no nodes")


def test_from_dict_validates() -> None:
    t = parse_graphml((TEMPLATES_DIR / "tpc_dqm.graphml").read_text())
    d = t.to_dict()
    d["nodes"][0]["priority"] = 42
    with pytest.raises(TemplateError, match="node 'decoder': attribute 'priority'"):
        Template.from_dict(d)
    d = t.to_dict()
    d["nodes"][0]["priorty"] = 1
    with pytest.raises(TemplateError, match="'priorty'"):
        Template.from_dict(d)
    d = t.to_dict()
    d["edges"].append(["summary", "decoder"])
    with pytest.raises(TemplateError, match="cycle"):
        Template.from_dict(d)


def test_templates_are_hashable_and_order_independent() -> None:
    a, b = (
        Node(name="a", command="true", env={"X": "1"}),
        Node(name="b", command="true"),
    )
    t1 = Template(name="t", trigger="*", budget_s=10, nodes=(b, a), edges=(("a", "b"),))
    t2 = Template(
        name="t", trigger="*", budget_s=10.0, nodes=(a, b), edges=(("a", "b"),)
    )
    assert t1 == t2 and hash(t1) == hash(t2)
    assert t1.nodes == (a, b)


# -- pictures ------------------------------------------------------------------


@pytest.mark.parametrize("path", TEMPLATE_FILES, ids=lambda p: p.name)
def test_dot_and_mermaid_mention_every_node_and_edge(path: Path) -> None:
    t = parse_graphml(path.read_text())
    dot = to_dot(t)
    assert dot.startswith("digraph ")
    for n in t.nodes:
        assert (
            f'"{n.name}" [label="{n.name}\\nqueue={n.queue} priority={n.priority}'
            in dot
        )
    for parent, child in t.edges:
        assert f'"{parent}" -> "{child}";' in dot

    mermaid = to_mermaid(t)
    assert mermaid.startswith("flowchart TD\n")
    ids = {}
    for i, n in enumerate(t.nodes):
        ids[n.name] = f"n{i}"
        assert f'n{i}["{n.name}<br/>' in mermaid
    for parent, child in t.edges:
        assert f"{ids[parent]} --> {ids[child]}" in mermaid


def test_dot_quotes_names_that_are_not_dot_identifiers() -> None:
    # A bare 1st-pass.v2 would be a DOT syntax error; quoted it is one id.
    node = Node(name="1st-pass.v2", command="true")
    t = Template(name="dqm-v1.2", trigger="*", budget_s=1, nodes=(node,))
    dot = to_dot(t)
    assert dot.startswith('digraph "dqm-v1.2" {')
    assert '"1st-pass.v2" [label=' in dot


@pytest.mark.parametrize("bad", ['say "hi"', "a b", "../etc", ".hidden", ""])
def test_refuses_awkward_node_names(bad: str) -> None:
    # Names become directory names and database keys: keep them plain.
    doc = graphml({bad.replace('"', "&quot;"): {"command": "true"}})
    refused(doc, "node name", repr(bad))


# -- expansion -----------------------------------------------------------------


def test_placeholders_constant() -> None:
    assert PLACEHOLDERS == {
        "input",
        "input_name",
        "workdir",
        "job_id",
        "workflow_id",
        "outdir",
        "parent_outdirs",
    }


def test_expand_scalars_and_unknown_left_alone() -> None:
    argv = ["cp", "{input}", "{outdir}/copy_{job_id}.bin", "{nosuch}", "${HOME}"]
    values = {"input": "/data/f.hdf5", "outdir": "/out", "job_id": "42"}
    assert expand(argv, values) == [
        "cp",
        "/data/f.hdf5",
        "/out/copy_42.bin",
        "{nosuch}",
        "${HOME}",
    ]


def test_expand_sequence_whole_element_splits() -> None:
    values = {"parent_outdirs": ["/o/a", "/o/b"]}
    assert expand(["ls", "{parent_outdirs}", "-l"], values) == [
        "ls",
        "/o/a",
        "/o/b",
        "-l",
    ]


def test_expand_empty_sequence_removes_element() -> None:
    assert expand(["ls", "{parent_outdirs}"], {"parent_outdirs": []}) == ["ls"]


def test_expand_sequence_inside_string_joins_with_comma() -> None:
    values = {"parent_outdirs": ("/o/a", "/o/b")}
    assert expand(["--in={parent_outdirs}"], values) == ["--in=/o/a,/o/b"]


def test_expand_is_not_format() -> None:
    # str.format would choke on these or evaluate attribute access.
    argv = ["{input.__class__}", "{0}", "{", "}", "{input}{input}"]
    assert expand(argv, {"input": "x"}) == ["{input.__class__}", "{0}", "{", "}", "xx"]


def test_expand_values_are_not_re_expanded() -> None:
    assert expand(["{input}"], {"input": "{outdir}", "outdir": "/o"}) == ["{outdir}"]


def test_expand_env() -> None:
    env = {
        "OUT": "{outdir}",
        "PARENTS": "{parent_outdirs}",
        "KEEP": "${HOME}",
        "N": "{nosuch}",
    }
    values = {"outdir": "/o", "parent_outdirs": ["/a", "/b"]}
    assert expand_env(env, values) == {
        "OUT": "/o",
        "PARENTS": "/a:/b",
        "KEEP": "${HOME}",
        "N": "{nosuch}",
    }


def test_round_trip_of_every_field_and_awkward_text() -> None:
    node = Node(
        name="n",
        command="""grep -e '<a & "b">' {input}""",
        priority=0,
        wall_s=0.1,
        queue="q.1-x",
        env={"Z": "ünï {outdir}", "A": "x=1;y<2"},
        budget_s=12.5,
        expected_s=0.0,
        max_running=1,
        stage_in=True,
    )
    t = Template(
        name="t",
        trigger="run[0-9]*.hdf5",
        budget_s=12.5,
        description="a <b> & c",
        nodes=(node,),
    )
    assert parse_graphml(to_graphml(t)) == t
    assert parse_graphml(to_graphml(t)).node("n").env == {
        "A": "x=1;y<2",
        "Z": "ünï {outdir}",
    }
    assert Template.from_dict(json.loads(json.dumps(t.to_dict()))) == t


def test_dagengine_imports_no_broker_or_database() -> None:
    import subprocess
    import sys

    code = (
        "import sys, p3s.dagengine;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('kombu', 'sqlalchemy')];"
        "sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
