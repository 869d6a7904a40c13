"""machinery/records.py: Record builds its JSON schema once; describe_fields makes prompt text from fields."""

from __future__ import annotations

from pydantic import BaseModel, Field

from machinery.records import Record, describe_fields


class Inner(Record):
    name: str


class Outer(Record):
    items: list[Inner]
    score: int = Field(ge=1, le=10, description="from 1 to 10")
    note: str | None = None


def test_a_records_schema_is_built_once_but_every_caller_gets_its_own_copy():
    from flyte.types._type_engine import CustomPydanticJsonSchemaGenerator

    for generator in ({}, {"schema_generator": CustomPydanticJsonSchemaGenerator}):
        fresh = BaseModel.model_json_schema.__func__(Outer, **generator)
        first = Outer.model_json_schema(**generator)
        assert first == fresh
        first["properties"].clear()  # a caller that edits its copy must not change the next one
        assert Outer.model_json_schema(**generator) == fresh


def test_each_class_has_its_own_schema():
    assert Inner.model_json_schema() != Outer.model_json_schema()
    assert Inner.model_json_schema()["title"] == "Inner"
    assert Outer.model_json_schema(mode="serialization") == BaseModel.model_json_schema.__func__(
        Outer, mode="serialization")


def test_the_pipelines_results_are_records():
    import pipeline

    for record in (pipeline.Critique, pipeline.Round, pipeline.RefineResult, pipeline.ReportFiles,
                   pipeline.TopicReport, pipeline.Usage):
        assert issubclass(record, Record), record


def test_describe_fields_lists_every_field_with_its_description():
    class Shape(BaseModel):
        score: int = Field(description="an integer")
        summary: str = Field(description="one sentence")

    assert describe_fields(Shape) == '"score": an integer;\n"summary": one sentence;'
