"""The pipeline registry: each pipeline is declared once, in code, as a DAG of stages.

A stage runs on a named queue (a django-q2 cluster: `default`, `gpu`, …) or on an
external engine type. It starts when every stage it depends on has completed, so
sequential, parallel and hybrid pipelines are only DAG shapes. A stage function gets a
StageContext (params, its parents' outputs, progress and log reports) and returns a
JSON-serializable output.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jsonschema

if TYPE_CHECKING:
    from jobs.pipelines.context import StageContext

StageFunction = Callable[["StageContext"], Any]
# Runs several jobs' attempts of one stage together (one forward pass on the gpu worker,
# jobs/pipelines/lib/inference.py): one output, or the StageError of that item, per context,
# in order.
BatchFunction = Callable[[list["StageContext"]], list[Any]]
ResultBuilder = Callable[[dict[str, Any]], Any]


class PipelineDefinitionError(Exception):
    """A pipeline declared in code is inconsistent (a programming error, found at start-up)."""


@dataclass(frozen=True)
class Stage:
    name: str
    run: StageFunction | None = None
    depends_on: tuple[str, ...] = ()
    queue: str = "default"
    engine_type: str | None = None
    # Set for stages whose attempts may run batched across jobs; `run` is then the same
    # work for one context, the batch of one (a StageError outcome raised).
    batch: BatchFunction | None = None

    def __post_init__(self) -> None:
        if self.run is None and self.batch is not None:
            object.__setattr__(self, "run", _alone(self.batch))


def _alone(batch: BatchFunction) -> StageFunction:
    def run(ctx: StageContext) -> Any:
        [outcome] = batch([ctx])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    return run


def sink_output(outputs: dict[str, Any], dag: Dag) -> Any:
    """The default job result: the output of the one sink stage, or of each sink by name."""
    sinks = dag.sinks()
    if len(sinks) == 1:
        return outputs.get(sinks[0])
    return {name: outputs.get(name) for name in sinks}


class Dag:
    """The stages of one job: a checked DAG (names unique, parents known, no cycle)."""

    def __init__(self, stages: tuple[Stage, ...], *, owner: str) -> None:
        names = [stage.name for stage in stages]
        if not names:
            raise PipelineDefinitionError(f"{owner}: a pipeline needs at least one stage")
        if len(set(names)) != len(names):
            raise PipelineDefinitionError(f"{owner}: stage names repeat")
        for stage in stages:
            unknown = set(stage.depends_on) - set(names)
            if unknown:
                raise PipelineDefinitionError(
                    f"{owner}.{stage.name}: unknown parents {sorted(unknown)}"
                )
            if (stage.run is None) == (stage.engine_type is None):
                raise PipelineDefinitionError(
                    f"{owner}.{stage.name}: give a function or an engine type, not both"
                )
        self.stages = stages
        self._by_name = {stage.name: stage for stage in stages}
        self.order = self._topological_order(owner)

    def _topological_order(self, owner: str) -> list[str]:
        done: list[str] = []
        remaining = {stage.name: set(stage.depends_on) for stage in self.stages}
        while remaining:
            ready = [name for name, parents in remaining.items() if parents <= set(done)]
            if not ready:
                raise PipelineDefinitionError(f"{owner}: the stages form a cycle")
            done.extend(ready)
            for name in ready:
                del remaining[name]
        return done

    def stage(self, name: str) -> Stage:
        return self._by_name[name]

    def roots(self) -> list[str]:
        return [stage.name for stage in self.stages if not stage.depends_on]

    def sinks(self) -> list[str]:
        parents = {parent for stage in self.stages for parent in stage.depends_on}
        return [stage.name for stage in self.stages if stage.name not in parents]

    def children(self, name: str) -> list[str]:
        return [stage.name for stage in self.stages if name in stage.depends_on]

    def queues(self) -> set[str]:
        return {stage.queue for stage in self.stages if stage.engine_type is None}


@dataclass(frozen=True)
class Pipeline:
    name: str
    description: str
    stages: tuple[Stage, ...]
    params_schema: Mapping[str, Any] = field(
        default_factory=lambda: {"type": "object", "additionalProperties": False}
    )
    # Builds the job's result from every stage's output; default: the sink stage's output.
    result: Callable[[dict[str, Any], Dag], Any] = sink_output
    # For pipelines whose shape depends on params (fan_out_fan_in's width): the stages of
    # one job. `stages` is then the shape for the default params, shown by /v1/pipelines.
    expand: Callable[[dict[str, Any]], tuple[Stage, ...]] | None = None

    def __post_init__(self) -> None:
        Dag(self.stages, owner=self.name)
        jsonschema.Draft202012Validator.check_schema(self.params_schema)

    def dag(self, params: dict[str, Any]) -> Dag:
        if self.expand is None:
            return Dag(self.stages, owner=self.name)
        return Dag(self.expand(params), owner=self.name)

    def validation_errors(self, params: Any) -> dict[str, list[str]]:
        """Field errors of `params` against the schema, keyed by field ('params' for the root)."""
        validator = jsonschema.Draft202012Validator(self.params_schema)
        errors: dict[str, list[str]] = {}
        for error in validator.iter_errors(params):
            path = ".".join(str(part) for part in error.absolute_path)
            errors.setdefault(f"params.{path}" if path else "params", []).append(error.message)
        return errors

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "params_schema": dict(self.params_schema),
            "stages": [
                {
                    "name": stage.name,
                    "depends_on": list(stage.depends_on),
                    "queue": None if stage.engine_type else stage.queue,
                    "engine_type": stage.engine_type,
                }
                for stage in self.stages
            ],
        }


_REGISTRY: dict[str, Pipeline] = {}


def register(pipeline: Pipeline) -> Pipeline:
    if pipeline.name in _REGISTRY and _REGISTRY[pipeline.name] is not pipeline:
        raise PipelineDefinitionError(f"pipeline {pipeline.name!r} is registered twice")
    _REGISTRY[pipeline.name] = pipeline
    return pipeline


def get(name: str) -> Pipeline | None:
    return _REGISTRY.get(name)


def single_stage_pipelines() -> list[str]:
    """Pipelines of one fixed stage whose result is that stage's output: the job can
    complete with its stage in one statement (jobs.services.stage_complete)."""
    return [
        pipeline.name
        for pipeline in _REGISTRY.values()
        if len(pipeline.stages) == 1 and pipeline.expand is None and pipeline.result is sink_output
    ]


def all_pipelines() -> list[Pipeline]:
    return sorted(_REGISTRY.values(), key=lambda pipeline: pipeline.name)
