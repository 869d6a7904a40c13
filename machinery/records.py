"""``Record``: the base of the pipeline's typed results, and prompt text made from a model's fields."""

from __future__ import annotations

import functools
import pickle
from typing import Any

from pydantic import BaseModel


class Record(BaseModel):
    """A pydantic model whose JSON schema is built once per class and arguments.

    Flyte asks the classes of a task's or traced call's inputs and outputs for
    their JSON schema on every call; pydantic rebuilds it on every request, which
    was the largest single cost of a traced call (see benchmarks/).
    """

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        # A fresh copy for every caller, as pydantic gives; unpickling is 6x faster than deepcopy.
        return pickle.loads(_pickled_schema(cls, args, tuple(sorted(kwargs.items()))))


@functools.cache
def _pickled_schema(cls: type[BaseModel], args: tuple, kwargs: tuple) -> bytes:
    return pickle.dumps(BaseModel.model_json_schema.__func__(cls, *args, **dict(kwargs)))


def describe_fields(model: type[BaseModel]) -> str:
    """One line per field, ``"name": description``: the JSON shape a prompt asks a model for.

    Generated from the pydantic model, so the prompt and the validation can never disagree.
    """
    return "\n".join(f'"{name}": {field.description};' for name, field in model.model_fields.items())
