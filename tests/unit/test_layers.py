"""Imports run one way (../shared/DESIGN.md, "Which way the imports run"; issue #16, Build 4).

Every module of llmtrain/ has a place in LAYERS below, lowest first. The test reads every
import of every llmtrain/**/*.py with `ast` (at the top of the file and inside functions) and
fails naming FILE:LINE for
  - an import of a higher layer (the core importing a stage, the CLI, the pipeline, the
    feedback app or the demo's rules; the base importing the model; ...);
  - a sideways import the layer does not allow: a stage importing another stage, one command
    importing another (a stage the feedback app, the report a stage, ...);
  - feedback/ reaching torch training code (training, losses, rl, rl_models, scoring), even
    through another module, and the web app (feedback.app) reaching torch at all;
  - a function-local import, unless it is listed in LAZY_LLMTRAIN (an llmtrain module, with the
    reason, which the file must state too) or its package in LAZY_THIRD_PARTY (heavy, optional
    or version-dependent third-party imports);
  - an import cycle, counting function-local imports too: so no local import can be there to
    dodge a cycle;
  - an import by a computed name (__import__, importlib.import_module), which no rule could see;
  - a module that is not in the table, or a table entry (or allow-list entry) that no longer
    matches anything.
Adding a module: put it in the lowest layer whose modules it imports from, and read the
message if the test disagrees.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "llmtrain"

# (layer, modules, which imports within the layer are allowed), lowest first. A module may
# import any module of a lower layer; within its own layer only as `sideways` says:
#   "acyclic": any module of the layer, as long as no import cycle forms (checked below);
#   "package": only modules of its own package (feedback.app -> feedback.store); and the
#              stages not even that (NEVER_SIDEWAYS: a stage never imports another stage).
LAYERS: list[tuple[str, list[str], str]] = [
    # No model, no data: errors, atomic files, typed configs, devices/torchrun, metrics files.
    # The config package: field rules, fields a stage refuses, YAML reading, shared sections,
    # the stage configs, loading with overrides (its __init__ re-exports them).
    ("base", ["llmtrain", "llmtrain.errors", "llmtrain.files", "llmtrain.config.rules", "llmtrain.config.unused",
              "llmtrain.config.yamlfile", "llmtrain.config.sections", "llmtrain.config.stages",
              "llmtrain.config.loading", "llmtrain.config", "llmtrain.dist", "llmtrain.metrics"], "acyclic"),
    # The networks: transformer, heads, adapters (LoRA, freezing), the RL modules' wrappers,
    # and the decoding engine (a fused, packed copy of a transformer's weights).
    ("model", ["llmtrain.model", "llmtrain.model.attention", "llmtrain.model.transformer", "llmtrain.model.heads", "llmtrain.model.adapters",
               "llmtrain.model.actor_critic", "llmtrain.model.decoder"], "acyclic"),
    # Library pieces a stage is made of: pure losses and RL maths, tokenizer and chat template,
    # data readers (JSONL lines in data.jsonl, every file format and Hub dataset in data.sources,
    # published record formats in data.formats, then one reader per kind), sampling, a chat's
    # history and streamed text (conversation), checkpoints.
    ("core", ["llmtrain.losses", "llmtrain.rl", "llmtrain.chat_template", "llmtrain.tokenizer", "llmtrain.data", "llmtrain.data.jsonl",
              "llmtrain.data.sources", "llmtrain.data.formats",
              "llmtrain.data.corpus", "llmtrain.data.packing", "llmtrain.data.sft", "llmtrain.data.prompts",
              "llmtrain.data.preference", "llmtrain.data.classify", "llmtrain.data.chitchat",
              "llmtrain.data.pretrain", "llmtrain.generate", "llmtrain.conversation", "llmtrain.checkpoint", "llmtrain.checkpoint.folders",
              "llmtrain.checkpoint.saving", "llmtrain.checkpoint.loading"], "acyclic"),
    # Models from elsewhere: Hugging Face folders and Hub ids in and out of our checkpoints; a
    # stage's init_from / policy / reward_model may name one (training.load_base imports it).
    ("interop", ["llmtrain.interop", "llmtrain.interop.hf", "llmtrain.interop.hf_config", "llmtrain.interop.hf_weights",
                 "llmtrain.interop.hf_tokenizer", "llmtrain.interop.hf_import", "llmtrain.interop.hf_export",
                 "llmtrain.interop.hub"], "acyclic"),
    # Shared by several stages: the stage skeleton, reward-model scoring, the RL run's models.
    ("stage parts", ["llmtrain.training", "llmtrain.scoring", "llmtrain.rl_models"], "acyclic"),
    # The demo's stated preferences (simulated annotator, "true" rule, style check): stages and
    # commands name a rule and hand its function to the library; the library never reads them.
    ("demo rules", ["llmtrain.styles"], "acyclic"),
    # What one command runs. Side by side: a stage never imports another stage, and no command
    # imports another (the feedback package's own modules import each other).
    ("commands", ["llmtrain.stages", "llmtrain.stages.pretrain", "llmtrain.stages.sft", "llmtrain.stages.classify",
                  "llmtrain.stages.reward", "llmtrain.stages.ppo", "llmtrain.stages.dpo", "llmtrain.stages.evaluate",
                  "llmtrain.feedback", "llmtrain.feedback.db", "llmtrain.feedback.annotators",
                  "llmtrain.feedback.store", "llmtrain.feedback.agreement", "llmtrain.feedback.web",
                  "llmtrain.feedback.auth", "llmtrain.feedback.pages", "llmtrain.feedback.api",
                  "llmtrain.feedback.app", "llmtrain.feedback.chatapi", "llmtrain.feedback.modelserver",
                  "llmtrain.feedback.modelworker", "llmtrain.feedback.candidates", "llmtrain.feedback.export",
                  "llmtrain.feedback.simulate", "llmtrain.feedback.arena_store", "llmtrain.feedback.arena_stats",
                  "llmtrain.feedback.arena_api", "llmtrain.feedback.arena_answers", "llmtrain.chat",
                  "llmtrain.report.figures", "llmtrain.report.prose", "llmtrain.report.write", "llmtrain.report"], "package"),
    # The demo's chain (llmtrain/pipeline/): its config, what each step uses and checks, --human,
    # the steps, and run() calling them in order (its __init__ re-exports them).
    ("pipeline", ["llmtrain.pipeline.config", "llmtrain.pipeline.prompts", "llmtrain.pipeline.checks",
                  "llmtrain.pipeline.human", "llmtrain.pipeline.answers", "llmtrain.pipeline.steps", "llmtrain.pipeline.rounds",
                  "llmtrain.pipeline.run", "llmtrain.pipeline"], "acyclic"),
    ("entry", ["llmtrain.cli", "llmtrain.cli.args", "llmtrain.cli.train", "llmtrain.cli.models",
               "llmtrain.cli.feedback", "llmtrain.cli.pipeline", "llmtrain.cli.__main__", "llmtrain.__main__"],
     "acyclic"),
]
NEVER_SIDEWAYS = ("llmtrain.stages.",)  # packages whose modules never import each other

# The feedback app and its helpers never reach torch training code, not even through another module.
TRAINING_CODE = {"llmtrain.training", "llmtrain.losses", "llmtrain.rl", "llmtrain.rl_models", "llmtrain.scoring"}
# The ranking web app loads no torch at all (it starts in a blink and runs beside training); its
# chat models run in a worker process (feedback.modelworker) that the app starts, never imports.
NO_TORCH = {"llmtrain.feedback.app", "llmtrain.feedback.modelserver"}

# Function-local imports of llmtrain modules: (file, module or "*": any import) -> why. The file
# must say so too (the word "lazily" or a "# lazy:" comment). An import cycle is never a reason:
# the cycle check below counts these imports.
CLI_LAZY = ("each command imports what it runs: `llmtrain --help`, a bad flag or a feedback command answers "
            "in 0.1 s instead of loading torch (2 s); nothing imports cli")
LAZY_LLMTRAIN: dict[tuple[str, str], str] = {
    ("llmtrain/cli/train.py", "*"): CLI_LAZY,
    ("llmtrain/cli/models.py", "*"): CLI_LAZY,
    ("llmtrain/cli/feedback.py", "*"): CLI_LAZY,
    ("llmtrain/cli/pipeline.py", "*"): CLI_LAZY,
    ("llmtrain/cli/args.py", "llmtrain.config"): "the flag checks read config's rules (50 ms): `llmtrain --help` "
                                                 "answers without them",
    ("llmtrain/pipeline/steps.py", "*"): "a pipeline YAML is checked, and --from resolved, before any stage "
                                         "(torch) loads; each step imports its stage; only cli imports pipeline",
    ("llmtrain/pipeline/rounds.py", "*"): "a round's check loads reward models and policies (torch) only when it "
                                          "runs, as steps.py's steps do",
    ("llmtrain/pipeline/answers.py", "*"): "models (torch) load when the style check or the report's samples run, "
                                           "not when the pipeline package is imported",
    ("llmtrain/pipeline/checks.py", "llmtrain.data.preference"): "it loads torch; the split checks run before "
                                                                 "any stage, when a YAML may still be refused",
    ("llmtrain/pipeline/human.py", "llmtrain.feedback.app"): "the web app (starlette) only when people rank "
                                                             "(--human)",
    ("llmtrain/config/rules.py", "llmtrain.dist"): "the `device` rule asks torch (2 s) which devices exist; a config "
                                                   "is read by commands that never run a model",
}
# Function-local imports of other packages: heavy, optional or moving between torch versions.
LAZY_THIRD_PARTY: dict[str, str] = {
    "torch.distributed": "sharded (FSDP/DCP) runs only; the import paths move between torch versions "
                         "(try/except fallbacks)",
    "torch.utils.tensorboard": "optional extra `tensorboard`",
    "matplotlib": "the report's plots only (slow import)",
    "uvicorn": "the web server, only when serving",
    "chitchat_dataset": "optional extra `data` (`llmtrain reward chitchat`)",
    "resource": "POSIX only (peak memory on CPU)",
    "torch._inductor": "run.compile only (private, version-dependent: training.check_compiler; 1 s to import)",
    "pyarrow": "optional extra `hub`: Parquet data files (data/sources.py)",
    "datasets": "optional extra `hub`: Hub datasets and folders written by save_to_disk (data/sources.py)",
    "huggingface_hub": "optional extra `hub`: Hub models (interop/hub.py) and a Hub dataset's snapshot in the "
                       "local cache when offline (data/sources.py); 0.3 s to import",
}


# ----------------------------------------------------------------------------- reading imports

def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def read_imports(root: Path) -> tuple[dict[str, Path], list[tuple[str, int, str, bool]]]:
    """Modules {name: file} under `root` (the llmtrain/ folder) and every import in them:
    (importing module, line, imported module, inside a function?)."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    out = []
    for mod, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        is_pkg = path.name == "__init__.py"
        for node, local in _walk(tree, False):
            if isinstance(node, ast.Call) and _dynamic_import(node.func):  # hides from every rule here
                out.append((mod, node.lineno, "<dynamic>", local))
            elif isinstance(node, ast.Import):
                out += [(mod, node.lineno, a.name, local) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the importing module's package upwards
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[:len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([node.module] if node.module else []))
                for a in node.names:  # `from llmtrain import checkpoint` imports a module
                    sub = f"{base}.{a.name}"
                    out.append((mod, node.lineno, sub if sub in files else base, local))
    return files, out


def _packages_of(mod: str) -> set[str]:
    """The packages that hold `mod`: llmtrain.cli.train -> {llmtrain, llmtrain.cli}."""
    parts = mod.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _dynamic_import(f) -> bool:
    """__import__(...), importlib.import_module(...), import_module(...)."""
    name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
    return name in ("__import__", "import_module")


def _walk(node, local):
    for child in ast.iter_child_nodes(node):
        yield child, local
        yield from _walk(child, local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))


# ----------------------------------------------------------------------------- the rules

def violations(root: Path, layers=LAYERS, lazy_llmtrain=LAZY_LLMTRAIN, lazy_third_party=LAZY_THIRD_PARTY,
               used: set | None = None) -> list[str]:
    """Every import in `root` against the layer order, as 'FILE:LINE: what is wrong' lines.
    `used` collects the allow-list entries that some import needed."""
    files, imports = read_imports(root)
    rel = {m: p.relative_to(root.parent).as_posix() for m, p in files.items()}
    rank = {m: i for i, (_, mods, _) in enumerate(layers) for m in mods}
    names = {i: name for i, (name, _, _) in enumerate(layers)}
    sideways = {i: rule for i, (_, _, rule) in enumerate(layers)}
    bad = [f"{rel[m]}: module {m} is in no layer of tests/unit/test_layers.py LAYERS: place it" for m in files
           if m not in rank]
    bad += [f"LAYERS lists {m}, which is not a module of {root.name}/" for m in rank if m not in files]
    pkg = {m: m if p.name == "__init__.py" else m.rsplit(".", 1)[0] for m, p in files.items()}
    by_rel = {r: files[m] for m, r in rel.items()}
    used = set() if used is None else used
    graph: dict[str, set[str]] = {m: set() for m in files}
    for src, line, target, local in imports:
        where = f"{rel[src]}:{line}"
        if target == "<dynamic>":
            bad.append(f"{where}: an import by a computed name (__import__, importlib.import_module): "
                       f"write an import statement, which this test can check")
            continue
        if target != "llmtrain" and not target.startswith("llmtrain."):
            if local and (rel[src], "*") in lazy_llmtrain:  # a file allowed to import anything lazily
                used.add((rel[src], "*"))
            elif local:
                allowed = next((k for k in lazy_third_party if target == k or target.startswith(k + ".")), None)
                if allowed is None:
                    bad.append(f"{where}: function-local import of {target}: import it at the top of the file "
                               f"(only heavy or optional packages may wait: LAZY_THIRD_PARTY)")
                used.add(allowed)
            continue
        if target not in files:
            bad.append(f"{where}: imports {target}, which is not a module of llmtrain/")
            continue
        # Importing a.b.c runs a/__init__ and a/b/__init__ first, except the importer's own packages:
        # they ran before it (cli/train.py importing cli/args.py does not run cli/__init__ again).
        parts, own = target.split("."), _packages_of(src)
        graph[src] |= ({".".join(parts[:i]) for i in range(2, len(parts))} - own | {target}) - {src}
        if local:
            key = next((k for k in ((rel[src], target), (rel[src], "*")) if k in lazy_llmtrain), None)
            if key is None:
                bad.append(f"{where}: function-local import of {target}: import it at the top of the file "
                           f"(a cycle is never the reason; a documented one goes into LAZY_LLMTRAIN)")
            used.add(key)
        if src not in rank or target not in rank:
            continue
        s, t = rank[src], rank[target]
        if t > s:
            bad.append(f"{where}: {src} ({names[s]}) imports {target} ({names[t]}), a higher layer")
        elif t == s and src != target:
            if any(src.startswith(p) and target.startswith(p) for p in NEVER_SIDEWAYS):
                bad.append(f"{where}: stage {src} imports stage {target}: stages never import each other "
                           f"(move what they share into a lower layer)")
            elif sideways[s] == "package" and not (pkg[src] == pkg[target] != "llmtrain"):
                bad.append(f"{where}: {src} imports {target}, both {names[s]}: side by side, neither imports the other")
    for key in lazy_llmtrain.keys() & used:
        if not any(w in by_rel[key[0]].read_text(encoding="utf-8") for w in ("lazily", "# lazy:")):
            bad.append(f"{key[0]}: its function-local imports are allowed in LAZY_LLMTRAIN, but the file does not "
                       f"say why (the word 'lazily' or a '# lazy:' comment)")
    bad += _cycles(graph, rel)
    torch_users = {src for src, _, target, _ in imports if target == "torch" or target.startswith("torch.")}
    for m in sorted(NO_TORCH & set(files)):
        for user in sorted((_closure(graph, m) | {m}) & torch_users):
            bad.append(f"{rel[m]}: {m} must not load torch, but reaches {user}, which imports it: "
                       + " -> ".join(_path(graph, m, user)))
    for m in sorted(files):
        if m.startswith("llmtrain.feedback"):
            reached = _closure(graph, m) & TRAINING_CODE
            if reached:
                bad.append(f"{rel[m]}: {m} reaches torch training code ({', '.join(sorted(reached))}) "
                           f"through its imports: " + " -> ".join(_path(graph, m, sorted(reached)[0])))
    return list(dict.fromkeys(bad))  # `from x import a, b` inside a function: one line, not two


def _closure(graph, start):
    seen, todo = set(), [start]
    while todo:
        for n in graph.get(todo.pop(), ()):
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


def _path(graph, start, goal):
    prev, todo = {start: None}, [start]
    while todo:
        n = todo.pop(0)
        if n == goal:
            out = []
            while n is not None:
                out.append(n)
                n = prev[n]
            return out[::-1]
        for m in sorted(graph.get(n, ())):
            if m not in prev:
                prev[m] = n
                todo.append(m)
    return [start, goal]


def _cycles(graph, rel) -> list[str]:
    """One line per import cycle found (depth-first; top-level and function-local imports)."""
    state, stack, out = {}, [], []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                cyc = stack[stack.index(m):] + [m]
                out.append(f"{rel.get(n, n)}: import cycle {' -> '.join(cyc)}: move what both need into a lower module")
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return out


# ----------------------------------------------------------------------------- the tests

def test_imports_follow_the_layer_order():
    used: set = set()
    bad = violations(PACKAGE, used=used)
    assert not bad, "imports against the layer order (tests/unit/test_layers.py):\n" + "\n".join(bad)


def test_the_allow_lists_hold_nothing_unused():
    """An entry that no import needs any more goes: the lists stay small and true."""
    used: set = set()
    violations(PACKAGE, used=used)
    assert [k for k in LAZY_LLMTRAIN if k not in used] == []
    assert [k for k in LAZY_THIRD_PARTY if k not in used] == []


def fake_package(tmp_path: Path, files: dict[str, str]) -> Path:
    """An empty copy of llmtrain/'s module tree, with `files` ({"llmtrain/x.py": source}) written in."""
    root = tmp_path / "llmtrain"
    for _, mods, _ in LAYERS:
        for m in mods:
            parts = m.split(".")
            is_pkg = any(o.startswith(m + ".") for _, ms, _ in LAYERS for o in ms) or m == "llmtrain"
            p = tmp_path.joinpath(*parts, "__init__.py") if is_pkg else tmp_path.joinpath(*parts[:-1], parts[-1] + ".py")
            p.parent.mkdir(parents=True, exist_ok=True)
            p.touch()
    for rel, src in files.items():
        (tmp_path / rel).write_text(src)
    return root


@pytest.mark.parametrize("path, source, expected", [
    ("llmtrain/losses.py", "import torch\n\nfrom llmtrain.stages import sft\n",
     "llmtrain/losses.py:3: llmtrain.losses (core) imports llmtrain.stages.sft (commands), a higher layer"),
    ("llmtrain/scoring.py", "from llmtrain.styles import RULES\n",
     "llmtrain/scoring.py:1: llmtrain.scoring (stage parts) imports llmtrain.styles (demo rules), a higher layer"),
    ("llmtrain/checkpoint/saving.py", "def f():\n    from llmtrain.feedback import app\n",
     "llmtrain/checkpoint/saving.py:2: llmtrain.checkpoint.saving (core) imports llmtrain.feedback.app (commands), "
     "a higher layer"),
    ("llmtrain/dist.py", "from llmtrain.model.transformer import DecoderLayer\n",
     "llmtrain/dist.py:1: llmtrain.dist (base) imports llmtrain.model.transformer (model), a higher layer"),
    ("llmtrain/data/sft.py", "from llmtrain import cli\n",
     "llmtrain/data/sft.py:1: llmtrain.data.sft (core) imports llmtrain.cli (entry), a higher layer"),
    ("llmtrain/stages/ppo.py", "from llmtrain.stages.reward import normalise\n",
     "llmtrain/stages/ppo.py:1: stage llmtrain.stages.ppo imports stage llmtrain.stages.reward"),
    ("llmtrain/stages/dpo.py", "from llmtrain.stages import sft\n",
     "llmtrain/stages/dpo.py:1: stage llmtrain.stages.dpo imports stage llmtrain.stages.sft"),
    ("llmtrain/stages/sft.py", "from llmtrain.feedback.store import FeedbackStore\n",
     "llmtrain/stages/sft.py:1: llmtrain.stages.sft imports llmtrain.feedback.store, both commands"),
    ("llmtrain/report/write.py", "from llmtrain.stages import evaluate\n",
     "llmtrain/report/write.py:1: llmtrain.report.write imports llmtrain.stages.evaluate, both commands"),
    ("llmtrain/training.py", "def f():\n    from llmtrain import checkpoint\n",
     "llmtrain/training.py:2: function-local import of llmtrain.checkpoint: import it at the top of the file"),
    ("llmtrain/data/preference.py", "def f():\n    import json\n",
     "llmtrain/data/preference.py:2: function-local import of json: import it at the top of the file"),
    ("llmtrain/config/__init__.py", "from llmtrain.metrics import Metrics\n",  # metrics -> config (below) closes a cycle
     "import cycle llmtrain.config -> llmtrain.metrics -> llmtrain.config"),
    ("llmtrain/cli/train.py", "from llmtrain.cli import COMMANDS\n",  # cli/__init__ imports train (below)
     "import cycle llmtrain.cli -> llmtrain.cli.train -> llmtrain.cli"),
    ("llmtrain/feedback/export.py", "from llmtrain.data import sft\n",  # data.sft -> losses (below)
     "llmtrain/feedback/export.py: llmtrain.feedback.export reaches torch training code (llmtrain.losses) through "
     "its imports: llmtrain.feedback.export -> llmtrain.data.sft -> llmtrain.losses"),
    ("llmtrain/pipeline/run.py", "def f():\n    return __import__('yaml').safe_dump({})\n",
     "llmtrain/pipeline/run.py:2: an import by a computed name (__import__, importlib.import_module)"),
    ("llmtrain/generate.py", "import importlib\nstage = importlib.import_module('llmtrain.stages.ppo')\n",
     "llmtrain/generate.py:2: an import by a computed name"),
    ("llmtrain/feedback/web.py", "import torch\n",  # app -> web (the fake app imports it below)
     "llmtrain/feedback/app.py: llmtrain.feedback.app must not load torch, but reaches llmtrain.feedback.web, "
     "which imports it: llmtrain.feedback.app -> llmtrain.feedback.web"),
    ("llmtrain/extra.py", "",
     "llmtrain/extra.py: module llmtrain.extra is in no layer of tests/unit/test_layers.py LAYERS"),
    ("llmtrain/cli/train.py", "def f():\n    import llmtrain.errors\n",  # allowed, but the file must say why
     "llmtrain/cli/train.py: its function-local imports are allowed in LAZY_LLMTRAIN, but the file does not say why"),
])
def test_the_check_catches_a_bad_import(tmp_path, path, source, expected):
    files = {path: source}
    if "cycle" in expected:
        files["llmtrain/metrics.py"] = "from llmtrain import config\n"
    if "llmtrain.cli.train ->" in expected:
        files["llmtrain/cli/__init__.py"] = "from llmtrain.cli import train\n"
    if "must not load torch" in expected:
        files["llmtrain/feedback/app.py"] = "from llmtrain.feedback import web\n"
    if "reaches torch" in expected:
        files["llmtrain/data/sft.py"] = "from llmtrain.losses import IGNORE\n"
    bad = violations(fake_package(tmp_path, files))
    assert any(expected in b for b in bad), "\n".join(bad)


def test_the_check_passes_a_clean_fake_tree(tmp_path):
    """The cases above fail for their bad import alone: the empty tree, and imports in the
    allowed directions (down, within a layer without a cycle, lazily where listed), pass."""
    files = {"llmtrain/stages/ppo.py": "from llmtrain import checkpoint, training\nfrom llmtrain.styles import RULES\n",
             "llmtrain/feedback/app.py": "from llmtrain.feedback import store\n",
             "llmtrain/interop/__init__.py": "from llmtrain.interop.hf import export_hf\n",
             "llmtrain/data/sft.py": "from llmtrain.data.jsonl import split\nfrom llmtrain.losses import IGNORE\n",
             "llmtrain/metrics.py": "from llmtrain import config\n",
             # a package's __init__ imports its modules, which import each other: no cycle
             "llmtrain/cli/__init__.py": "from llmtrain.cli import train\n",
             "llmtrain/cli/train.py": "from llmtrain.cli.args import check_out\n",
             "llmtrain/report/write.py": "def f():\n    import matplotlib.pyplot\n",
             "llmtrain/config/rules.py": "def f():\n    # lazy: torch\n    from llmtrain import dist\n"}
    bad = violations(fake_package(tmp_path, files))
    assert bad == []


def test_a_package_re_exports_its_modules_without_a_cycle(tmp_path):
    """checkpoint/__init__ re-exports names of its modules, which import each other: no cycle,
    since the package began importing before them. Two modules importing each other, or a module
    importing its package's names back by name, still are cycles."""
    init = {"llmtrain/checkpoint/__init__.py": "from llmtrain.checkpoint.saving import save\n"}
    ok = {**init, "llmtrain/checkpoint/saving.py": "from llmtrain.checkpoint.folders import step_dirs\n"}
    assert violations(fake_package(tmp_path / "ok", ok)) == []
    back = {**init, "llmtrain/checkpoint/saving.py": "from llmtrain.checkpoint import step_dirs\n"}
    assert any("import cycle llmtrain.checkpoint -> llmtrain.checkpoint.saving -> llmtrain.checkpoint" in b
               for b in violations(fake_package(tmp_path / "back", back)))
    mutual = {"llmtrain/checkpoint/saving.py": "from llmtrain.checkpoint.folders import step_dirs\n",
              "llmtrain/checkpoint/folders.py": "from llmtrain.checkpoint.saving import save\n"}
    assert any("import cycle llmtrain.checkpoint.folders -> llmtrain.checkpoint.saving" in b
               for b in violations(fake_package(tmp_path / "mutual", mutual)))


def test_dist_finds_the_decoder_blocks_by_their_mark():
    """dist.shard (base) no longer imports model.transformer to find the blocks FSDP shards one
    by one: it takes the modules marked shard_unit, which must be exactly the decoder layers."""
    from llmtrain.config import ModelConfig
    from llmtrain.model import Transformer
    from llmtrain.model.heads import ScoreModel

    c = ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, ffn_dim=48, max_seq_len=16)
    for model in (Transformer(c), ScoreModel(c, 1)):
        marked = [m for m in model.modules() if getattr(m, "shard_unit", False)]
        assert marked == list(model.model.layers) and len(marked) == 3
