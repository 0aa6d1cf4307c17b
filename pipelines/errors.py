"""One exception type for problems the user can fix, so entry points print one line, not a traceback."""


class UserError(Exception):
    """Bad input or environment: the message names what is wrong and what to do about it."""


def closest(name: str, choices) -> str:
    """' Did you mean --x?' for the nearest valid name, or '' when nothing is close."""
    import difflib

    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""
