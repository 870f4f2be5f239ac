import pytest

# The dialect adapters assert on the tests' behalf: let pytest explain their failures.
pytest.register_assert_rewrite("tests.e2e.dialects")
