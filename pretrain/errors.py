"""The project's two error types, in a module with no imports so every package can raise them.

`ConfigError`: a configuration value (experiment YAML, model JSON, DeepSpeed file, command
line) is invalid; the message names the key. `TrainingError`: a run cannot start or continue
(a refused resume, repeated non-finite steps); the message says why and what to do. The
trainer's command line prints either and exits 2, without a traceback.
"""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the offending key."""


class TrainingError(RuntimeError):
    """A run cannot start or continue; the message says why and what to do."""
