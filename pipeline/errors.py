"""The one error type a user can cause (bad params, missing or corrupt data, no GPU).

Every stage catches it at the top (see :func:`pipeline.cli.run_stage`) and prints
its message as one line, then exits non-zero, with no traceback.
"""


class PipelineError(Exception):
    """A user-fixable problem. The message names the file or key and the fix."""


class ConfigError(PipelineError):
    """params.yaml is wrong: a bad type, an unknown key or an impossible value."""


class DataError(PipelineError):
    """Input data is missing, corrupt or unsafe (catalog, h5 files, windows)."""
