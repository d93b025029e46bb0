"""The worker's contract with the official Wan2.2 code it subclasses (pipeline.S2VPipeline is an
official `wan.WanS2V` built without the official __init__): every attribute that the official
methods the worker calls read on `self` is one the worker sets, so a future wan22 that reads one
more fails here, not at job time. The sizing (planning.video_size) calls the official method
without an instance: it must read nothing of `self`."""
import ast
import inspect
import textwrap

from s2v_worker.pipeline import WanS2V

# The official methods the worker calls on itself (pipeline.py: the speech encoding).
CALLED = ("encode_audio",)


def attributes_read(method_name: str, seen: set[str] | None = None) -> set[str]:
    """`self.<name>` reads in an official method and in the official methods it calls."""
    seen = set() if seen is None else seen
    if method_name in seen:
        return set()
    seen.add(method_name)
    source = textwrap.dedent(inspect.getsource(getattr(WanS2V, method_name)))
    reads = set()
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id == "self" and isinstance(node.ctx, ast.Load)):
            reads.add(node.attr)
    for name in sorted(reads):
        if inspect.isfunction(getattr(WanS2V, name, None)):
            reads |= attributes_read(name, seen)
    return reads


def test_every_attribute_the_official_methods_read_is_set(tiny_pipeline):
    for method in CALLED:
        missing = {name for name in attributes_read(method)
                   if not hasattr(type(tiny_pipeline), name) and name not in vars(tiny_pipeline)}
        assert not missing, f"WanS2V.{method} reads {sorted(missing)}, which from_components never sets"


def test_the_official_sizing_reads_nothing_of_its_instance():
    assert attributes_read("get_size_less_than_area") == set()


def test_the_check_sees_what_the_official_methods_read():
    """The walk finds real reads (so an empty result is not why the test above passes)."""
    assert {"audio_encoder", "device", "fps"} <= attributes_read("encode_audio")
    assert "read_last_n_frames" in attributes_read("get_gen_size")
