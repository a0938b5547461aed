"""The errors effjax raises for input a user can fix. Each message names the file, key or flag at
fault; the `effjax` command prints it as one line and exits with status 2."""


class CheckpointError(ValueError):
  """A checkpoint that does not fit the model: the message names the file and the tensor."""


class BadRecord(ValueError):
  """A record that cannot be used. `reason` is short and shared by records with the same fault
  (it is what the skip summary counts); `detail` is specific to this record."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason} ({detail})" if detail else reason)
    self.reason = reason
    self.detail = detail


class DataError(ValueError):
  """A problem set that cannot be used as given: no usable record, or (strict loading) any record
  that cannot be used. The message names the file and line."""
