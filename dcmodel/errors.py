"""The one error type for mistakes a user can fix: the CLI prints it as one line and exits 2."""


class UserError(Exception):
  """Bad config, data, mesh or workdir: the message names what is wrong and what is expected."""
