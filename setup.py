"""The one compiled part: a pass over a decode step's logits (``thoughtform.backends._scan``).

Everything else is in pyproject.toml. The extension is optional: where it cannot be built (no C
compiler or Python headers) the install goes on and ``backends.logits`` uses its numpy path.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "thoughtform.backends._scan",
            ["src/thoughtform/backends/_scan.c"],
            extra_compile_args=["-O2", "-std=c11"],
            optional=True,
        )
    ]
)
