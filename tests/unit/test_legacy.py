"""The older system's templates converted on import (--legacy), and p3s's own no-op nodes."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from xml.sax.saxutils import escape

import pytest

from p3s.cli import EXIT_OK, EXIT_USAGE, main
from p3s.dagengine import Node, Template, check_import, expand, expand_env, parse_graphml, to_dot, to_mermaid
from p3s.dagengine.legacy import convert, map_priority
from p3s.errors import TemplateError
from tests.stack import Stack, graphml, make_settings, terminal_jobs, wait_for

NODE_KEYS = ("payload", "env", "timelimit", "priority", "jobtype")
EDGE_KEYS = ("name", "datatag", "dirpath", "datatype", "comment")
SHELL_ENV = {"P3S_EXECMODE": "SHELL"}
FILTER = 'cat "$INFILE" | tr a-z A-Z > "$OUTFILE"'


def legacy_graphml(
    nodes: Mapping[str, Mapping[str, object]],
    edges: list[tuple[str, str, Mapping[str, str]]] = (),  # type: ignore[assignment]
    typed: bool = True,
) -> str:
    """A template in the older system's format: its attribute names, declared as its files declare them."""

    def kind(k: str) -> str:
        return "int" if typed and k in ("timelimit", "priority") else "string"

    keys = [f'<key id="n_{k}" for="node" attr.name="{k}" attr.type="{kind(k)}"/>' for k in NODE_KEYS]
    keys += [f'<key id="e_{k}" for="edge" attr.name="{k}" attr.type="string"/>' for k in EDGE_KEYS]
    body = []
    for name, attrs in nodes.items():
        data = "".join(
            f'<data key="n_{k}">{escape(json.dumps(v) if isinstance(v, dict) else str(v))}</data>'
            for k, v in attrs.items()
        )
        body.append(f'<node id="{name}">{data}</node>')
    for i, (src, dst, attrs) in enumerate(edges):
        data = "".join(f'<data key="e_{k}">{escape(v)}</data>' for k, v in attrs.items())
        body.append(f'<edge id="e{i}" source="{src}" target="{dst}">{data}</edge>')
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<graphml xmlns="http://graphml.graphdrawing.org/xmlns">'
        + "".join(keys)
        + '<graph id="G" edgedefault="directed">'
        + "".join(body)
        + "</graph></graphml>"
    )


def fan_out() -> str:
    """An entry no-op, three shell filters reading the input and writing their own file, an exit no-op."""
    nodes: dict[str, dict[str, object]] = {"entry": {"jobtype": "noop"}, "exit": {"jobtype": "noop"}}
    edges = []
    for i, prio in enumerate((10, 5, 0), start=1):
        nodes[f"filter{i}"] = {"payload": FILTER, "env": SHELL_ENV, "jobtype": "filter", "timelimit": 60,
                               "priority": prio}
        edges.append(("entry", f"filter{i}", {"name": "raw.dat", "datatag": "INFILE", "datatype": "raw"}))
        edges.append((f"filter{i}", "exit", {"name": f"filter{i}.txt", "datatag": "OUTFILE", "dirpath": "/data/out",
                                             "datatype": "text", "comment": "upper case"}))
    return legacy_graphml(nodes, edges)


def refusal(doc: str) -> list[str]:
    with pytest.raises(TemplateError) as info:
        convert(doc, "t", "*.dat", 60)
    head, *problems = str(info.value).splitlines()
    assert head.startswith("cannot convert the older system's template, ")
    assert head.endswith(f"{len(problems)} problem{'s' if len(problems) != 1 else ''}:")
    return [p.removeprefix("  - ") for p in problems]


# -- the mapping ----------------------------------------------------------------------------------


def test_the_fan_out_converts_with_no_ops_shells_and_data_items_as_variables() -> None:
    conv = convert(fan_out(), "fan", "*.dat", 60)
    tpl = conv.template
    assert (tpl.name, tpl.trigger, tpl.budget_s) == ("fan", "*.dat", 60)
    assert tpl.roots() == ("entry",)
    assert tpl.node("entry").noop and tpl.node("exit").noop
    assert tpl.node("entry").argv == () and tpl.node("entry").env == {}
    for i in (1, 2, 3):
        f = tpl.node(f"filter{i}")
        assert not f.noop
        assert f.argv == ("/bin/sh", "-c", FILTER)
        # The input through the root no-op's data item, the output into the filter's own directory.
        assert dict(f.env) == {"INFILE": "{input}", "OUTFILE": f"{{outdir}}/filter{i}.txt"}
        assert f.wall_s == 60
    assert [tpl.node(f"filter{i}").priority for i in (1, 2, 3)] == [9, 5, 0]
    assert tpl.parents("exit") == ("filter1", "filter2", "filter3")
    assert conv.labels == {"filter1": "filter", "filter2": "filter", "filter3": "filter"}
    assert conv.edge_descriptions[("filter1", "exit")] == "datatype: text; comment: upper case"
    assert conv.edge_descriptions[("entry", "filter1")] == "datatype: raw"
    notes = "\n".join(conv.notes)
    assert "node 'filter1': P3S_EXECMODE=SHELL: the payload runs as /bin/sh -c '<payload>'" in notes
    assert "dirpath '/data/out' ignored: p3s owns the output layout" in notes
    assert "'entry' is a root no-op, so INFILE is the workflow's input file" in notes
    assert "floor(p * 9 / 10 + 1/2): filter1 10 -> 9, filter2 5 -> 5, filter3 0 -> 0" in notes
    check_import(tpl)


def test_the_converted_file_imports_without_legacy_to_the_same_template() -> None:
    conv = convert(fan_out(), "fan", "*.dat", 60)
    text = conv.graphml()
    assert text.startswith("<!-- converted from the older system's template; notes:")
    assert parse_graphml(text) == conv.template
    # The labels and descriptions are in the file for its readers, and an import ignores them.
    assert "<data key=" in text and ">filter</data>" in text and "comment: upper case" in text


def test_a_two_step_chain_passes_the_file_from_the_first_outdir_to_the_second() -> None:
    doc = legacy_graphml(
        {
            "reco": {"payload": "reco --mode fast", "env": {"CALIB": "v7"}, "timelimit": 300, "priority": 7},
            "plots": {"payload": "plots --style dqm", "jobtype": "histograms"},
        },
        [("reco", "plots", {"name": "reco.root", "datatag": "RECO_FILE", "datatype": "ROOT"})],
    )
    conv = convert(doc, "chain", "run*.hdf5", 600)
    tpl = conv.template
    reco, plots = tpl.node("reco"), tpl.node("plots")
    assert reco.argv == ("reco", "--mode", "fast") and plots.argv == ("plots", "--style", "dqm")
    assert dict(reco.env) == {"CALIB": "v7", "RECO_FILE": "{outdir}/reco.root"}
    assert dict(plots.env) == {"RECO_FILE": "{outdir:reco}/reco.root"}
    assert (reco.wall_s, reco.priority) == (300, 6)
    assert plots.wall_s == Node.wall_s and plots.priority == Node.priority
    assert plots.outdir_refs == {"reco"}
    assert conv.labels == {"plots": "histograms"}
    assert "node 'plots': no timelimit; wall_s is p3s's default, 3600 s" in conv.notes
    # What the pilot makes of it with the values the dispatcher gives.
    values = {"outdir": "/out/4/plots", "outdir:reco": "/out/4/reco"}
    assert expand_env(plots.env, values) == {"RECO_FILE": "/out/4/reco/reco.root"}
    assert expand_env(reco.env, {"outdir": "/out/4/reco"})["RECO_FILE"] == "/out/4/reco/reco.root"
    assert parse_graphml(conv.graphml()) == tpl


def test_priorities_keep_their_order_on_the_narrower_range() -> None:
    mapped = [map_priority(p) for p in range(11)]
    assert mapped == [0, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9]
    assert mapped == sorted(mapped)


def test_two_data_items_between_the_same_jobs_are_two_variables() -> None:
    doc = legacy_graphml(
        {"a": {"payload": "make-two"}, "b": {"payload": "use-two"}},
        [("a", "b", {"name": "x.dat", "datatag": "X"}), ("a", "b", {"name": "y.dat", "datatag": "Y"})],
    )
    tpl = convert(doc, "t", "*", 60).template
    assert tpl.edges == (("a", "b"),)
    assert dict(tpl.node("b").env) == {"X": "{outdir:a}/x.dat", "Y": "{outdir:a}/y.dat"}


def test_a_shell_payload_with_quotes_survives_the_conversion() -> None:
    payload = "echo 'it''s' \"$HOME\" | wc -c > out.txt"
    doc = legacy_graphml({"a": {"payload": payload, "env": SHELL_ENV}})
    node = convert(doc, "t", "*", 60).template.node("a")
    assert node.argv == ("/bin/sh", "-c", payload)


# -- refusals: one message, every problem ---------------------------------------------------------


def test_a_graph_without_job_attributes_is_refused_once() -> None:
    doc = legacy_graphml({"a": {}, "b": {}}, [("a", "b", {})])
    (problem,) = refusal(doc)
    assert "no node has any of its job attributes (payload, env, timelimit, priority, jobtype)" in problem


def test_a_p3s_template_given_as_legacy_is_told_to_import_without_it() -> None:
    (problem,) = refusal(graphml({"a": {"command": "echo"}}))
    assert "import it without --legacy" in problem


def test_a_node_without_payload_that_is_not_a_no_op_is_refused() -> None:
    doc = legacy_graphml({"a": {"payload": "echo"}, "b": {"jobtype": "filter"}}, [("a", "b", {})])
    assert refusal(doc) == ["node 'b': has no payload and is not a no-op (jobtype 'noop')"]


def test_every_problem_is_listed_at_once() -> None:
    doc = legacy_graphml(
        {
            "nopay": {"jobtype": "filter"},
            "prio": {"payload": "a", "priority": 11},
            "wall": {"payload": "b", "timelimit": "soon"},
            "env": {"payload": "c", "env": "not json"},
            "mode": {"payload": "d", "env": {"P3S_EXECMODE": "BATCH"}},
            "shell": {"payload": "decode $INPUT > out.txt"},
            "mid": {"jobtype": "noop"},
        },
        [
            ("prio", "wall", {"name": "x.dat"}),
            ("wall", "env", {"name": "y.dat", "datatag": "P3S_INPUT"}),
            ("env", "mode", {"name": "../up.dat", "datatag": "UP"}),
            ("prio", "mid", {}),
            ("mid", "shell", {"name": "m.dat", "datatag": "M"}),
            ("mode", "ghost", {}),
        ],
        typed=False,
    )
    problems = refusal(doc)
    expected = [
        "node 'nopay': has no payload",
        "node 'prio': attribute 'priority' must be an integer from 0 to 10, got '11'",
        "node 'wall': attribute 'timelimit' must be a number of seconds > 0, got 'soon'",
        "node 'env': attribute 'env' must be a JSON object of string values, got 'not json'",
        "node 'mode': P3S_EXECMODE='BATCH' is not understood",
        "edge 'prio' -> 'wall': a data item needs both 'name' and 'datatag'",
        "edge 'wall' -> 'env': datatag 'P3S_INPUT' would replace a variable p3s gives every payload",
        "edge 'env' -> 'mode': name '../up.dat' must be a plain file name",
        "edge 'mid' -> 'shell': its source is a no-op node that is not a root",
        "edge 'mode' -> 'ghost': unknown node(s) 'ghost'",
        "node 'shell': attribute 'command' has shell syntax",
    ]
    assert len(problems) == len(expected), problems
    for text in expected:
        assert sum(text in p for p in problems) == 1, (text, problems)
    (shell,) = [p for p in problems if "shell syntax" in p]
    assert shell.endswith("(in the older template: env P3S_EXECMODE=SHELL for a shell command line)")


def test_a_variable_given_two_values_is_refused() -> None:
    doc = legacy_graphml(
        {"a": {"payload": "a"}, "b": {"payload": "b"}, "c": {"payload": "c"}},
        [("a", "c", {"name": "a.dat", "datatag": "IN"}), ("b", "c", {"name": "b.dat", "datatag": "IN"})],
    )
    (problem,) = refusal(doc)
    assert problem.startswith("node 'c': variable IN gets two values, '{outdir:a}/a.dat'")


def test_a_cycle_is_refused() -> None:
    doc = legacy_graphml({"a": {"payload": "a"}, "b": {"payload": "b"}}, [("a", "b", {}), ("b", "a", {})])
    (problem,) = refusal(doc)
    assert "graph has a cycle" in problem


# -- p3s's own no-op nodes --------------------------------------------------------------------------


def test_a_no_op_node_runs_nothing_and_takes_no_command() -> None:
    assert Node("join", noop=True).argv == ()
    with pytest.raises(TemplateError, match=r"node 'join': a no-op node \(noop = true\) runs nothing, so it takes"
                                            r" no 'command', 'env'"):
        Node("join", "echo hi", env={"A": "b"}, noop=True)
    with pytest.raises(TemplateError, match="attribute 'command' is required"):
        parse_graphml(graphml({"a": {"priority": "3"}}), name="t")


def test_a_no_op_node_in_graphml_snapshots_and_pictures() -> None:
    text = graphml({"start": {"noop": "true"}, "work": {"command": "echo {input}"}, "end": {"noop": True}},
                   edges=[("start", "work"), ("work", "end")])
    tpl = parse_graphml(text, name="t")
    assert [n.noop for n in tpl.nodes] == [True, False, True]
    assert Template.from_dict(tpl.to_dict()) == tpl
    assert "noop" not in tpl.node("work").to_dict()  # snapshots without no-ops read as before
    assert tpl.node("end").to_dict()["noop"] is True
    dot = to_dot(tpl)
    assert '"start" [label="start\\nno-op", shape=ellipse, style=dashed];' in dot
    mermaid = to_mermaid(tpl)
    assert 'n0(["start<br/>no-op"])' in mermaid and 'n1["work<br/>default p5 3600s"]' in mermaid


def test_outdir_of_a_node_must_name_an_ancestor_that_runs_something() -> None:
    a, b = Node("a", "make"), Node("b", "use {outdir:a}/x")
    assert Template("t", "*", 60, (a, b), (("a", "b"),)).node("b").outdir_refs == {"a"}
    with pytest.raises(TemplateError, match="names 'a', which is not an ancestor of 'b'"):
        Template("t", "*", 60, (a, b))
    with pytest.raises(TemplateError, match="names a no-op node, which writes nothing"):
        Template("t", "*", 60, (Node("a", noop=True), b), (("a", "b"),))
    assert expand(("use", "{outdir:a}/x"), {"outdir:a": "/o/1/a"}) == ["use", "/o/1/a/x"]
    with pytest.raises(TemplateError, match=r"puts \{outdir:a\} inside the shell's script"):
        check_import(Template("t", "*", 60, (a, Node("b", "/bin/sh -c 'cat {outdir:a}/x'")), (("a", "b"),)))


# -- the command line -----------------------------------------------------------------------------


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in [k for k in __import__("os").environ if k.startswith("P3S_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("P3S_STATE_DIR", str(tmp_path / "state"))
    return tmp_path


def test_dry_run_prints_the_graphml_and_notes_and_imports_nothing(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    legacy = state / "fan.legacy.graphml"
    legacy.write_text(fan_out())
    args = ["dag", "import", "--legacy", str(legacy), "--name", "fan", "--trigger", "*.dat", "--budget", "60"]
    assert main([*args, "--dry-run"]) == EXIT_OK
    out = capsys.readouterr()
    assert parse_graphml(out.out) == convert(fan_out(), "fan", "*.dat", 60).template
    assert "note: node 'filter1': P3S_EXECMODE=SHELL" in out.err
    assert not (state / "state").exists() or not list((state / "state").iterdir())  # no database made

    assert main(["db", "upgrade"]) == EXIT_OK
    converted = state / "fan.graphml"
    converted.write_text(out.out)
    assert main(["dag", "import", str(converted)]) == EXIT_OK  # the reviewed file, without --legacy
    assert "template fan version 1: 5 node(s)" in capsys.readouterr().out
    assert main(args) == EXIT_OK
    captured = capsys.readouterr()
    assert "note: " in captured.err
    assert main(["dag", "show", "fan"]) == EXIT_OK
    shown = capsys.readouterr().out
    assert "NOOP" in shown and "True" in shown


def test_a_refused_legacy_file_is_one_message_with_every_problem(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    legacy = state / "bad.graphml"
    legacy.write_text(legacy_graphml({"a": {"jobtype": "x"}, "b": {"jobtype": "y"}}))
    code = main(["dag", "import", "--legacy", str(legacy), "--name", "t", "--trigger", "*", "--budget", "9"])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"p3s: {legacy}: cannot convert the older system's template, 2 problems:")
    assert "node 'a': has no payload" in err and "node 'b': has no payload" in err
    assert "Traceback" not in err


def test_legacy_options_go_together(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    legacy = state / "fan.graphml"
    legacy.write_text(fan_out())
    assert main(["dag", "import", "--legacy", str(legacy), "--name", "fan"]) == EXIT_USAGE
    assert "needs --name, --trigger and --budget" in capsys.readouterr().err
    assert main(["dag", "import", str(legacy), "--trigger", "*"]) == EXIT_USAGE
    assert "--trigger: only with --legacy FILE" in capsys.readouterr().err


# -- the dispatcher: a no-op job ends at once, without a pilot --------------------------------------


def test_no_op_jobs_finish_without_a_pilot_on_the_embedded_default(tmp_path: Path) -> None:
    watch = tmp_path / "incoming"
    watch.mkdir()
    stack = Stack(make_settings(tmp_path), watch=watch, pilots=1).start()
    try:
        conv = convert(fan_out(), "fan", "*.dat", 60)
        stack.import_template(conv.graphml(), "fan")
        (watch / "run1.dat").write_text("hello p3s\n")
        jobs = {j["node"]: j for j in wait_for(lambda: terminal_jobs(stack, 5), what="the fan-out")}
        assert {n: j["state"] for n, j in jobs.items()} == dict.fromkeys(jobs, "finished")
        for noop in ("entry", "exit"):
            assert jobs[noop]["pilot_id"] is None and jobs[noop]["started_at"] is None
            assert jobs[noop]["reason"] == "no-op: nothing to run"
        for i in (1, 2, 3):
            assert jobs[f"filter{i}"]["pilot_id"] is not None
            out = stack.settings.output_path / str(jobs["exit"]["workflow_id"]) / f"filter{i}" / f"filter{i}.txt"
            assert out.read_text() == "HELLO P3S\n"
        (wf,) = stack.workflows()
        assert wf["state"] == "finished"
        assert stack.audit().ok, stack.audit().problems
    finally:
        stack.stop()


def test_a_template_of_only_a_no_op_finishes_at_intake(tmp_path: Path) -> None:
    watch = tmp_path / "incoming"
    watch.mkdir()
    stack = Stack(make_settings(tmp_path), watch=watch, pilots=0).start()
    try:
        stack.import_template(graphml({"only": {"noop": "true"}}), "nothing")
        (watch / "run1.dat").write_text("x")
        (job,) = wait_for(lambda: terminal_jobs(stack, 1), what="the no-op")
        assert (job["state"], job["pilot_id"]) == ("finished", None)
        wait_for(lambda: [w["state"] for w in stack.workflows()] == ["finished"], what="the workflow to finish")
    finally:
        stack.stop()
