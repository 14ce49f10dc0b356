"""Mirrors modules/errors.py: display(e, task) reports an exception and goes on."""
import traceback

displayed = []


def display(e, task, *, full_traceback=False):
    displayed.append((task, e))
    traceback.print_exception(type(e), e, e.__traceback__)
