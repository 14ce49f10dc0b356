"""The fake A1111 `modules` (tests/webui/fake_a1111) against facts read from the real source.

tests/webui/a1111_facts.json records, from AUTOMATIC1111 v1.10.1 (commit 82a973c0), for every
public name a fake file defines: whether the real file has it, its kind, and for functions and
methods the parameters in order (name, kind, has a default). It was written by an `ast` pass
over the real files and holds names and parameter lists only. This test checks each fake
against it: the same names, kinds and signatures, except for the documented deviations below.
A name added to a fake needs its fact (from the real source) before this test passes.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import re
from pathlib import Path

import pytest

HERE = Path(__file__).parent
FAKE_ROOT = HERE / "fake_a1111"
FACTS = json.loads((HERE / "a1111_facts.json").read_text(encoding="utf-8"))
REPO = HERE.parent.parent

FAKE_FILES = {name: FAKE_ROOT / "modules" / f"{name.split('.', 1)[1]}.py" for name in FACTS["modules"]
              if name.startswith("modules.")}
FAKE_FILES["networks"] = FAKE_ROOT / "networks.py"  # extensions-builtin/Lora/networks.py

# Names the fakes define that A1111 does not have (the facts say exists: false): test-only.
TEST_ONLY = {
    "modules.deepbooru:DeepDanbooru.started": "counts start() calls for the tests",
    "modules.deepbooru:DeepDanbooru.stopped": "counts stop() calls for the tests",
    "modules.deepbooru:FakeDeepDanbooruModel": "stands for modules/deepbooru_model.py's DeepDanbooruModel",
    "modules.devices:gc_calls": "counts torch_gc() calls for the tests",
    "modules.errors:displayed": "records display() calls for the tests",
    "modules.lowvram:calls": "counts send_everything_to_cpu() calls for the tests",
    "modules.processing:Processed.p": "dataclass field holding the real __init__'s `p` argument",
    "modules.processing:Processed.images_list": "dataclass field behind the `images` property (real: self.images)",
    "modules.processing:StableDiffusionProcessingTxt2Img.closed": "tells the tests close() was called",
    "modules.processing:calls": "records process_images() calls for the tests",
    "modules.processing:step_hooks": "per-step hooks the tests install",
    "modules.sd_hijack:optimizations_applied": "lets a test see whether the fake's hijack is on",
    "modules.sd_hijack:original_forward": "ldm's CrossAttention.forward (real: attention_CrossAttention_forward)",
    "modules.sd_samplers:SamplerData": "real: modules/sd_samplers_common.py's SamplerData",
    "modules.shared:Options": "imported for the fake's own opts (real shared imports the options module)",
    "modules.shared:State": "imported for the fake's own state (real: shared_state.State, set in shared_init)",
    "modules.shared_state:State.history": "records job_no/textinfo assignments for the tests",
    "modules.shared_state:State.__setattr__": "feeds State.history",
    "modules.ui_loadsave:UiLoadsave.registered": "lists every (key, component) registered, for the tests",
    "networks:FakeNetwork": "stands for extensions-builtin/Lora/network.py's Network",
}

# Signatures that differ from the real one: rule, and why. Rules:
#   omits_trailing_defaults - the fake's parameters are the real ones' first N; the rest have defaults
#   keyword_subset - every fake parameter is a real one (same kind, default), in the real order,
#                    and every real one it leaves out has a default (we construct it by keyword)
#   differs:<fake parameters> - the fake's parameters are exactly these (see the reason)
SIGNATURES = {
    "modules.call_queue:wrap_gradio_call_no_job": (
        "omits_trailing_defaults", "add_stats: no one passes it (wrap_gradio_call calls it without)"),
    "modules.processing:Processed.__init__": (
        "omits_trailing_defaults", "only p, images_list, seed, info are passed (by the fake process_images)"),
    "modules.processing:StableDiffusionProcessingTxt2Img.__init__": (
        "keyword_subset", "the fields we pass by keyword; the other real fields keep their defaults"),
    "modules.options:Options.__init__": (
        "differs:self, data_labels=", "built once by the fake shared.py; A1111 builds it in shared_init "
                                      "with restricted_opts; lib_lora never constructs Options"),
}

DATA_KINDS = {"attribute", "property"}  # a fake may hold as a property what the real one stores


# --------------------------------------------------------------------------------------------
# What a fake file defines, read from its source


def _targets(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def _class_members(cls: ast.ClassDef) -> dict[str, str]:
    """name -> method / property / attribute: the class body and self.X assignments."""
    out: dict[str, str] = {}
    for node in cls.body:
        for t in _targets(node):
            out.setdefault(t, "attribute")
    for node in ast.walk(cls):
        if isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                    out.setdefault(t.attr, "attribute")
    is_dataclass = any(ast.unparse(d).split("(")[0] == "dataclass" for d in cls.decorator_list)
    if is_dataclass:
        out["__init__"] = "method"
    for node in cls.body:
        if isinstance(node, ast.FunctionDef):
            decos = [ast.unparse(d) for d in node.decorator_list]
            out[node.name] = "property" if "property" in decos else "method"
    return {k: v for k, v in out.items() if not k.startswith("_") or (k.startswith("__") and k.endswith("__"))}


def fake_definitions(path: Path) -> dict[str, tuple[list[str], dict[str, str] | None]]:
    """Public top-level names (defs, classes, assignments, names imported from modules.*) ->
    (base classes, members) for classes, ([], None) otherwise."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: dict[str, tuple[list[str], dict[str, str] | None]] = {}
    for node in tree.body:
        names = _targets(node)
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names = [node.name]
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("modules."):
            names = [a.asname or a.name for a in node.names]
        for name in names:
            if name.startswith("_"):
                continue
            if isinstance(node, ast.ClassDef):
                out[name] = ([ast.unparse(b) for b in node.bases], _class_members(node))
            else:
                out[name] = ([], None)
    return out


# --------------------------------------------------------------------------------------------
# Comparing


def _params(fn) -> list[dict]:
    return [{"name": p.name, "kind": p.kind.name, "has_default": p.default is not inspect.Parameter.empty}
            for p in inspect.signature(fn).parameters.values()]


def _render(params: list[dict]) -> str:
    parts, star = [], False
    for p in params:
        if p["kind"] == "KEYWORD_ONLY" and not star:
            parts.append("*")
            star = True
        prefix = {"VAR_POSITIONAL": "*", "VAR_KEYWORD": "**"}.get(p["kind"], "")
        star = star or p["kind"] == "VAR_POSITIONAL"
        parts.append(prefix + p["name"] + ("=" if p["has_default"] else ""))
    return ", ".join(parts)


def _optional(p: dict) -> bool:
    return p["has_default"] or p["kind"] in ("VAR_POSITIONAL", "VAR_KEYWORD")


def signature_problem(key: str, fake: list[dict], real: list[dict]) -> str | None:
    if fake == real:
        return None
    shown = f"{key}: fake ({_render(fake)}) vs A1111 ({_render(real)})"
    if key not in SIGNATURES:
        return f"{shown}: differs, and no allowed deviation is recorded"
    rule = SIGNATURES[key][0]
    if rule == "omits_trailing_defaults":
        ok = len(fake) < len(real) and real[:len(fake)] == fake and all(_optional(p) for p in real[len(fake):])
    elif rule == "keyword_subset":
        by_name = {p["name"]: (i, p) for i, p in enumerate(real)}
        order = [by_name[p["name"]][0] for p in fake if p["name"] in by_name]
        kept = {p["name"] for p in fake}
        ok = (all(p["name"] in by_name and by_name[p["name"]][1] == p for p in fake) and order == sorted(order)
              and all(_optional(p) for p in real if p["name"] not in kept))
    else:
        ok = rule == f"differs:{_render(fake)}"
    return None if ok else f"{shown}: breaks its allowed deviation {rule!r}"


def _runtime_kind(obj) -> str:
    if inspect.isclass(obj):
        return "class"
    if inspect.isfunction(obj) or inspect.isbuiltin(obj):
        return "function"
    return "attribute"


def check_module(module_name: str, fake) -> list[str]:
    facts = FACTS["modules"][module_name]["names"]
    defined = fake_definitions(FAKE_FILES[module_name])
    problems = []
    for name in sorted(set(defined) - set(facts)):
        problems.append(f"{module_name}:{name}: defined by the fake, no fact recorded from the A1111 source")
    for name, fact in facts.items():
        key = f"{module_name}:{name}"
        if name not in defined or not hasattr(fake, name):
            problems.append(f"{key}: recorded from A1111 but the fake does not define it")
            continue
        if not fact["exists"]:
            if key not in TEST_ONLY:
                problems.append(f"{key}: not in A1111 {FACTS['modules'][module_name]['file']} and not allowed as test-only")
            continue
        obj = getattr(fake, name)
        if _runtime_kind(obj) != fact["kind"]:
            problems.append(f"{key}: fake is a {_runtime_kind(obj)}, A1111's is a {fact['kind']}")
            continue
        if fact["kind"] == "function":
            problems.append(signature_problem(key, _params(obj), fact["params"]))
        if fact["kind"] != "class" or "members" not in fact:
            continue
        bases, members = defined[name]
        problems += [f"{key}: fake base {b} is not among A1111's {fact['bases']}" for b in bases if b not in fact["bases"]]
        for member in sorted(set(members) - set(fact["members"])):
            problems.append(f"{key}.{member}: defined by the fake, no fact recorded from the A1111 source")
        for member, mfact in fact["members"].items():
            mkey = f"{key}.{member}"
            if member not in members:
                problems.append(f"{mkey}: recorded from A1111 but the fake class does not define it")
            elif not mfact["exists"]:
                if mkey not in TEST_ONLY:
                    problems.append(f"{mkey}: not in A1111's class and not allowed as test-only")
            elif (members[member] in DATA_KINDS) != (mfact["kind"] in DATA_KINDS) or \
                    (members[member] == "method") != (mfact["kind"] == "method"):
                problems.append(f"{mkey}: fake is a {members[member]}, A1111's is a {mfact['kind']}")
            elif mfact["kind"] == "method":
                problems.append(signature_problem(mkey, _params(vars(obj)[member]), mfact["params"]))
    return [p for p in problems if p]


# --------------------------------------------------------------------------------------------
# Tests


def test_facts_are_from_v1_10_1():
    src = FACTS["source"]
    assert src["repo"] == "AUTOMATIC1111/stable-diffusion-webui"
    assert src["commit"] == "82a973c04367123ae98bd9abdf80d9eda9b910e2"
    assert src["version"] == "v1.10.1"
    assert set(FACTS["modules"]) == set(FAKE_FILES)
    on_disk = {f"modules.{p.stem}" for p in (FAKE_ROOT / "modules").glob("*.py") if p.stem != "__init__"}
    assert on_disk | {"networks"} == set(FAKE_FILES), "every fake file needs its facts"


@pytest.mark.parametrize("module_name", sorted(FAKE_FILES))
def test_fake_matches_a1111(webui, module_name):
    fake = importlib.import_module(module_name)
    problems = check_module(module_name, fake)
    assert not problems, "\n".join(problems)


def test_allowed_deviations_are_still_needed():
    """Each allow-list entry names a fact that is absent in A1111 / a signature that differs."""
    absent = set()
    for module_name, entry in FACTS["modules"].items():
        for name, fact in entry["names"].items():
            if not fact["exists"]:
                absent.add(f"{module_name}:{name}")
            for member, mfact in fact.get("members", {}).items():
                if not mfact["exists"]:
                    absent.add(f"{module_name}:{name}.{member}")
    assert set(TEST_ONLY) <= absent, f"stale test-only entries: {sorted(set(TEST_ONLY) - absent)}"
    assert absent <= set(TEST_ONLY), f"absent in A1111, not allowed: {sorted(absent - set(TEST_ONLY))}"
    for key in SIGNATURES:
        module_name, _, qual = key.partition(":")
        name, _, member = qual.partition(".")
        fact = FACTS["modules"][module_name]["names"][name]
        fact = fact["members"][member] if member else fact
        assert fact["exists"] and "params" in fact, f"{key}: no recorded A1111 signature to deviate from"
    assert len(SIGNATURES) + len(TEST_ONLY) < 30, "the allow-lists are meant to stay small"


def test_signature_deviations_are_still_needed(webui):
    for key in SIGNATURES:
        module_name, _, qual = key.partition(":")
        name, _, member = qual.partition(".")
        fact = FACTS["modules"][module_name]["names"][name]
        obj = getattr(importlib.import_module(module_name), name)
        fake = _params(vars(obj)[member]) if member else _params(obj)
        real = fact["members"][member]["params"] if member else fact["params"]
        assert fake != real, f"{key}: matches A1111 now; drop its SIGNATURES entry"


def test_options_and_flags_exist_in_a1111(webui):
    """shared.opts keys and shared.cmd_opts fields: the fake's, and those lib_lora reads."""
    keys, fields = FACTS["shared.opts"]["keys"], FACTS["shared.cmd_opts"]["fields"]
    read_keys, read_fields = set(), set()
    for path in [REPO / "lib_lora/hosts/webui.py", REPO / "lib_lora/hosts/webui_app.py", REPO / "scripts/fast_lora.py"]:
        text = path.read_text(encoding="utf-8")
        read_keys |= {k for k in re.findall(r'\bopt\("([a-z_0-9]+)"', text) if not k.startswith("fast_lora")}
        read_fields |= set(re.findall(r'getattr\((?:cmd|shared\.cmd_opts|a1111\("shared"\)\.cmd_opts), "([a-z_0-9]+)"', text))
    shared = webui.shared
    problems = [f"opts.{k}: no fact recorded" for k in sorted((set(shared.opts.data_labels) | read_keys) - set(keys))]
    problems += [f"cmd_opts.{k}: no fact recorded" for k in sorted((set(vars(shared.cmd_opts)) | read_fields) - set(fields))]
    problems += [f"opts.{k}: not in A1111's modules/shared_options.py" for k, f in keys.items() if not f["exists"]]
    problems += [f"cmd_opts.{k}: not an A1111 command-line flag" for k, f in fields.items() if not f["exists"]]
    assert read_keys and read_fields, "the patterns for lib_lora's reads found nothing"
    assert not problems, "\n".join(problems)
