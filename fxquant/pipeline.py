"""Pass infrastructure: the pass contract, a registry by name, and a textual pass manager.

A pass is a frozen dataclass whose fields are its options and whose ``name`` class variable
is its pipeline name. ``__call__(gm, ctx) -> PassResult`` does the graph surgery. The
:class:`PassManager` parses a pipeline such as ``"trace,observe,calibrate,quantize{w=8,a=8},verify"``,
runs it, verifies the graph after every pass, and can dump the graph after every pass.
"""

from __future__ import annotations

import dataclasses
import re
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch import fx

from fxquant.errors import FxquantError, PassError, RecipeError
from fxquant.files import atomic_write_text
from fxquant.recipe import Recipe


@dataclass
class PassResult:
    """What a pass returns: the (possibly new) module, whether it changed, and counters."""

    graph_module: fx.GraphModule
    modified: bool
    info: dict = field(default_factory=dict)
    # the pass as the pipeline should record it when its choices came from data (e.g.
    # inject-offsets' chosen sites): a saved model then rebuilds without calibration data
    resolved: Any = None


@dataclass
class PassContext:
    """Everything a pass may read besides the graph.

    ``calib`` is a list of input batches (each a tuple of model arguments); ``calibrate``
    is false when a compiled model is being rebuilt for loading, so passes build their
    modules' structure without statistics. ``state`` carries data between passes.
    ``history`` gets each pass's spec and info, ``seconds`` its wall time (the pass and the
    verification after it), in the same order.
    """

    recipe: Recipe
    calib: list[tuple] | None = None
    example_inputs: tuple | None = None
    concrete_args: dict | None = None
    calibrate: bool = True
    progress: bool = False
    state: dict = field(default_factory=dict)
    history: list[tuple[str, dict]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def spec_name(spec: str) -> str:
    """The pass name of a pipeline item: ``"reconstruct{steps=750}"`` → ``"reconstruct"``."""
    return spec.split("{", 1)[0]


class Pass:
    """Base class of every pass. Subclasses are frozen dataclasses with ``name`` set."""

    name: ClassVar[str] = ""
    # True for a pass that reuses the graph outputs ``calibrate`` computed for each batch:
    # calibrate keeps them (ctx.state["calibration_outputs"]) only when a pass of the run says so
    reads_calibration_outputs: ClassVar[bool] = False

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:  # pragma: no cover
        raise NotImplementedError

    def spec(self) -> str:
        """The pipeline text that rebuilds this pass with its current options."""
        defaults = type(self)()
        opts = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(defaults, f.name)]
        return f"{self.name}{{{','.join(opts)}}}" if opts else self.name


_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available to pipelines under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no pass name")
    if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:
        raise TypeError(f"{cls.__name__} must be a frozen dataclass")
    _REGISTRY[cls.name] = cls
    return cls


def registered_passes() -> dict[str, type[Pass]]:
    import fxquant.passes  # noqa: F401  - registers the built-in passes

    return dict(_REGISTRY)


_ITEM = re.compile(r"\s*([A-Za-z][\w-]*)\s*(\{[^{}]*\})?\s*(,|$)")


def _parse_value(text: str, tp: Any, where: str) -> Any:
    text = text.strip()
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if text.lower() == "none":
            return None
        tp = args[0]
    if tp is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise RecipeError(f"{where} must be true or false, got '{text}'")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise RecipeError(f"{where} must be an integer, got '{text}'") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise RecipeError(f"{where} must be a number, got '{text}'") from None
    return text


def parse_pipeline(spec: str) -> list[Pass]:
    """Parse ``"a,b{x=1,y=2},c"`` into pass instances, rejecting unknown names and options."""
    passes = registered_passes()
    result: list[Pass] = []
    pos = 0
    spec = spec.strip()
    if not spec:
        raise RecipeError("empty pipeline: give passes separated by commas, e.g. "
                          "'trace,observe,calibrate,quantize,verify'")
    while pos < len(spec):
        match = _ITEM.match(spec, pos)
        if not match:
            raise RecipeError(f"cannot parse pipeline '{spec}' at position {pos}: expected "
                              "name or name{key=value,...}")
        name, body, _ = match.groups()
        if name not in passes:
            raise RecipeError(f"unknown pass '{name}' in pipeline; registered passes: "
                              f"{', '.join(sorted(passes))}")
        cls = passes[name]
        hints = typing.get_type_hints(cls)
        valid = [f.name for f in dataclasses.fields(cls)]
        kwargs = {}
        for item in (body[1:-1].split(",") if body and body[1:-1].strip() else []):
            if "=" not in item:
                raise RecipeError(f"option '{item.strip()}' of pass '{name}' needs key=value")
            key, value = (s.strip() for s in item.split("=", 1))
            key = key.replace("-", "_")
            if key not in valid:
                raise RecipeError(f"unknown option '{key}' for pass '{name}'; valid options: "
                                  f"{', '.join(valid) or '(none)'}")
            if key in kwargs:  # the later one would win unseen
                raise RecipeError(f"option '{key}' of pass '{name}' is given twice; give it once")
            kwargs[key] = _parse_value(value, hints[key], f"{name}.{key}")
        try:
            result.append(cls(**kwargs))
        except (ValueError, TypeError) as exc:
            raise RecipeError(f"pass '{name}': {exc}") from None
        pos = match.end()
    return result


def verify_graph(gm: fx.GraphModule) -> None:
    """Structural checks run after every pass; raise ``ValueError(node, message)``."""
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in modules:
            raise _NodeProblem(node.name, f"calls missing submodule '{node.target}'")
        if node.op == "get_attr":
            owner, _, attr = node.target.rpartition(".")
            if not hasattr(modules.get(owner, gm) if owner else gm, attr):
                raise _NodeProblem(node.name, f"reads missing attribute '{node.target}'")
    for name, module in gm.named_modules():
        check = getattr(module, "check", None)
        if callable(check) and hasattr(module, "describe"):
            try:
                check()
            except ValueError as exc:
                raise _NodeProblem(name, str(exc)) from None
    gm.graph.lint()


class _NodeProblem(Exception):
    def __init__(self, node: str, message: str):
        super().__init__(message)
        self.node = node
        self.message = message


DumpFn = Callable[[fx.GraphModule], str]


class PassManager:
    """Runs passes in order, verifying the graph after each one.

    ``dump_dir`` writes ``NN-<pass>.txt`` (the node table) after every pass.
    """

    def __init__(self, passes: Iterable[Pass] | str, *, verify: bool = True,
                 dump_dir: str | Path | None = None, dump_fn: DumpFn | None = None):
        self.passes = parse_pipeline(passes) if isinstance(passes, str) else list(passes)
        self.verify = verify
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.dump_fn = dump_fn

    @property
    def spec(self) -> str:
        return ",".join(p.spec() for p in self.passes)

    def run(self, module: torch.nn.Module, ctx: PassContext) -> fx.GraphModule:
        passes = list(self.passes)
        if not isinstance(module, fx.GraphModule) and (not passes or passes[0].name != "trace"):
            passes.insert(0, registered_passes()["trace"]())
        if self.dump_dir is not None:
            prepare_dump_dir(self.dump_dir)
        ctx.state["keep_calibration_outputs"] = any(p.reads_calibration_outputs for p in passes)
        done: list[str] = []
        current: Any = module
        for index, p in enumerate(passes):
            started = time.perf_counter()
            try:
                result = p(current, ctx)
            except FxquantError as exc:
                if isinstance(exc, PassError):
                    raise
                raise type(exc)(f"pass '{p.name}': {exc}") from exc
            except Exception as exc:  # a bug or bad input deep inside: name the pass
                raise PassError(p.name, f"{type(exc).__name__}: {exc}",
                                previous=tuple(done)) from exc
            current = result.graph_module
            if result.resolved is not None:
                passes[index] = result.resolved
                if p in self.passes:  # the recorded spec (an inserted trace is not listed)
                    self.passes[self.passes.index(p)] = result.resolved
            if self.verify:
                try:
                    verify_graph(current)
                except _NodeProblem as problem:
                    raise PassError(p.name, f"graph does not verify: {problem.message}",
                                    node=problem.node, previous=tuple(done)) from None
                except RuntimeError as exc:
                    raise PassError(p.name, f"graph does not verify: {exc}",
                                    previous=tuple(done)) from None
            ctx.history.append((p.spec(), dict(result.info)))
            ctx.seconds.append(time.perf_counter() - started)
            done.append(p.name)
            if self.dump_dir is not None:
                dump = self.dump_fn or _default_dump
                atomic_write_text(self.dump_dir / f"{index:02d}-{p.name}.txt", dump(current),
                                  "graph dump")
        return current


# The files a dump writes: NN-<pass>.txt, and NN-<pass>.<fmt> from graphviz.GraphDumper.
_DUMP_FILE = re.compile(r"\d{2}-([A-Za-z][\w-]*)\.(txt|dot|svg|html)")


def prepare_dump_dir(folder: str | Path) -> list[Path]:
    """Check that ``folder`` can hold dumps (OutputError if not), create it, and remove the
    dumps a previous run left there, so that a shorter pipeline's dumps are not mixed with a
    longer one's. Only fxquant's own files go: ``NN-<pass>.txt|dot|svg|html`` where
    ``<pass>`` is a registered pass name (or ``graph``). Returns the removed paths."""
    from fxquant.files import check_output_dir

    folder = check_output_dir(folder, "dump folder")
    folder.mkdir(exist_ok=True)
    names = set(registered_passes()) | {"graph"}
    removed = []
    for path in sorted(folder.iterdir()):
        match = _DUMP_FILE.fullmatch(path.name)
        if match and match.group(1) in names and path.is_file():
            path.unlink()
            removed.append(path)
    return removed


def _default_dump(gm: fx.GraphModule) -> str:
    from fxquant.inspect import graph_table

    return graph_table(gm)
