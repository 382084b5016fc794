"""The one exception type that reaches users: a single sentence naming the file or key at fault."""


class UcpflowError(Exception):
    """A problem with the user's input that ucpflow reports in one sentence and stops."""


class CheckpointError(UcpflowError):
    """The checkpoint on disk is missing, incomplete, corrupt or not what the conversion needs."""
