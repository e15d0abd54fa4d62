"""Typed task descriptors (gpu_runtime/cuda/tasks.py): packing, the generated
device header, and every device accessor checked field by field against the
Python layout (the header compiled as host C++)."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_runtime.cuda.compiler import kernel_source, kernels_dir
from gpu_runtime.cuda.tasks import LAYOUTS, TASK_ARGS, Field, TaskLayout, main, render_header

from ._harness import harness


def test_the_generated_header_is_current():
    """kernels/tasks.cuh is exactly what the layouts render (regenerate with python -m gpu_runtime.cuda.tasks)."""
    assert kernel_source("tasks.cuh") == render_header()
    assert main(["--check"]) == 0


def test_kernels_read_task_words_only_through_the_accessors():
    """No kernel indexes a task's argument words by hand: every field goes through a generated accessor."""
    names = [p.name for p in kernels_dir().iterdir() if p.suffix in (".cu", ".cuh") and p.name != "tasks.cuh"]
    assert "executor.cu" in names and "handler_kv.cuh" in names
    for name in names:
        src = re.sub(r"//.*", "", kernel_source(name))
        assert not re.search(r"\bt\.a\[|\.a\[\s*\d", src), name


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_pack_then_unpack_gives_every_field_back(data):
    """Every layout packs named fields into 14 words and unpacks them unchanged (half-word fields: 32 bits)."""
    layout = data.draw(st.sampled_from(list(LAYOUTS.values())))
    values = {f.name: data.draw(st.integers(0, 2**32 - 1 if f.half else 2**64 - 1)) for f in layout.fields}
    words = layout.pack(**values)
    assert len(words) == TASK_ARGS
    assert layout.unpack(words) == values
    used = {f.word for f in layout.fields}
    assert all(words[w] == 0 for w in range(TASK_ARGS) if w not in used)


def test_pack_refuses_a_half_word_value_over_32_bits_and_missing_fields():
    """A value that does not fit its half word, or a required field left out, is an error, not a silent mix."""
    kv = LAYOUTS["CHECKPOINT_COMMIT"]
    base = dict(data=1, capacity=2, epoch=3, t0=4, t1=5, per=6, log0=7, tag=8, commit_records=1, commit_offset=2,
                body_len=3, region=0)
    with pytest.raises(ValueError, match="t1"):
        kv.pack(**{**base, "t1": 1 << 32})
    with pytest.raises(TypeError, match="log0"):
        kv.pack(**{k: v for k, v in base.items() if k != "log0"})


def test_overlapping_fields_are_refused_when_a_layout_is_defined():
    """Two fields on the same word (or half word) make the layout definition fail."""
    with pytest.raises(ValueError, match="overlaps"):
        TaskLayout("BAD", 99, "", (Field("a", 3, ""), Field("b", 3, "", half="hi")))
    with pytest.raises(ValueError, match="word"):
        TaskLayout("BAD", 99, "", (Field("a", 14, ""),))
    TaskLayout("OK", 99, "", (Field("a", 3, "", half="lo"), Field("b", 3, "", half="hi")))


@pytest.fixture(scope="module")
def dll(tmp_path_factory):
    return harness(Path(tmp_path_factory.mktemp("harness")))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 2**64 - 1), min_size=TASK_ARGS, max_size=TASK_ARGS))
def test_every_device_accessor_reads_its_field(dll, words):
    """For random slot words, each accessor macro of tasks.cuh (compiled as C++) returns what the Python layout
    unpacks for that field: the device and the producer agree on every field of every kind."""
    fields = [(lay, f) for lay in LAYOUTS.values() for f in lay.fields]
    out = (ctypes.c_uint64 * len(fields))()
    n = dll.cnc_test_task_fields((ctypes.c_uint64 * TASK_ARGS)(*words), out)
    assert n == len(fields)
    want = [lay.unpack(words)[f.name] for lay, f in fields]
    assert list(out) == want
