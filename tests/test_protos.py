"""The checked-in generated protobuf code matches its .proto sources."""
from protos import generate


def test_generated_code_is_fresh():
    assert generate.stale_files() == [], "run: python -m protos.generate"
