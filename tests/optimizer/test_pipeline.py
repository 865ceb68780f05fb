"""Pipeline text: parse, print back, presets, and clear errors."""

import pytest

from optimizer import PRESETS, FixedPoint, PipelineError, format_pipeline, parse_pipeline
from optimizer.pipeline import coerce_pipeline


@pytest.mark.parametrize(
    "text",
    [
        "cleanup",
        "cleanup,fold-constants,fuse-conv-bn",
        "cleanup(remove_unused_inputs=false),fold-constants(max_growth=1.5,fold_shapes=false)",
        "fixpoint(cleanup,fold-constants),fuse-conv-bn",
        "fixpoint(cleanup,fixpoint(fold-constants,fuse-conv-bn))",
    ],
)
def test_text_round_trips(text):
    steps = parse_pipeline(text)
    assert format_pipeline(steps) == text
    assert format_pipeline(parse_pipeline(format_pipeline(steps))) == text


def test_whitespace_defaults_and_quotes_normalise():
    steps = parse_pipeline(" cleanup ( remove_unused_inputs = true ) , fold-constants( max_growth='2' ) ")
    assert format_pipeline(steps) == "cleanup,fold-constants"
    assert steps[1].max_growth == 2.0 and isinstance(steps[1].max_growth, float)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_parse(name):
    steps = parse_pipeline(name)
    assert format_pipeline(steps) == PRESETS[name]


def test_default_preset_is_a_fixed_point_group():
    (group,) = parse_pipeline("default")
    assert isinstance(group, FixedPoint)
    names = [p.name for p in group.steps]
    assert names[0] == "cleanup"
    fusions = {"fuse-conv-bn", "fuse-affine", "fuse-matmul-add", "fuse-gemm-transpose", "fuse-pad", "fuse-layernorm", "fuse-gelu"}
    assert fusions | {"fold-constants", "fold-shapes", "cse", "simplify-layout-ops"} <= set(names)


def test_presets_can_be_used_as_steps():
    steps = parse_pipeline("default,convert-fp16")
    assert format_pipeline(steps) == PRESETS["fp16"]


@pytest.mark.parametrize(
    "text,message",
    [
        ("cleanup,fuse-conv-nb", "unknown pass 'fuse-conv-nb'; did you mean 'fuse-conv-bn'"),
        ("fold-constants(max_grwth=2)", "has no option 'max_grwth'; did you mean 'max_growth'"),
        ("fold-constants(max_growth=big)", "expects float; got 'big'"),
        ("cleanup(remove_unused_inputs=maybe)", "expects bool"),
        ("cleanup(true)", "must be written key=value"),
        ("cleanup,,fuse-conv-bn", "empty step"),
        ("cleanup(remove_unused_inputs=true", "unclosed parenthesis"),
        ("fixpoint()", "needs at least one pass"),
        ("clean up", "cannot parse pipeline step"),
    ],
)
def test_bad_pipelines_name_the_problem(text, message):
    with pytest.raises(PipelineError, match=None) as info:
        parse_pipeline(text)
    assert message in str(info.value)


def test_python_list_and_text_mean_the_same():
    from passes.cleanup import FoldConstants

    mixed = coerce_pipeline(["cleanup", FoldConstants(max_growth=1.5)])
    assert format_pipeline(mixed) == "cleanup,fold-constants(max_growth=1.5)"
    assert format_pipeline(mixed) == format_pipeline(parse_pipeline("cleanup,fold-constants(max_growth=1.5)"))
