"""BWAreaError: input bwarea cannot use (a bad file, field or option); the CLI prints it as one line."""


class BWAreaError(ValueError):
    """Bad input, named in the message: which file, field or option, and what was wrong with it.

    A ValueError, so code that catches ValueError keeps working.
    """
