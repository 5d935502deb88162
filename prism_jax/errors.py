"""The two kinds of expected failure. The command line ends either with one `prism_jax: error: ...`
line; every other exception is a bug and keeps its traceback.

  ConfigError    a config field (or command-line flag) has an invalid value; the message names it
                 (`recover.ipc=0: expected ...`) and what was expected.
  ArtifactError  a file or directory (data, teachers, checkpoints, a stage's artifacts, the work
                 directory) is missing, corrupt, or inconsistent with the config; the message names
                 it and says what to do.

Both subclass ValueError, so callers that catch ValueError keep working.
"""

from __future__ import annotations


class ConfigError(ValueError):
  """A config field has an invalid value; the message names the field and what was expected."""


class ArtifactError(ValueError):
  """A file is missing, corrupt or inconsistent with the requested configuration."""


EXPECTED = (ConfigError, ArtifactError, FloatingPointError)
"""What the command line reports as one line (FloatingPointError: a non-finite loss, which names
the stage, unit and iteration)."""
