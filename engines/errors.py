"""The one exception type the pack raises for bad user input.

ComfyUI shows an exception's message in the node's error panel; every message says what is
wrong and what to do, so a user never has to read a traceback.
"""


class FlenUserError(ValueError):
    """Bad input or a missing model: the message tells the user what to fix."""
