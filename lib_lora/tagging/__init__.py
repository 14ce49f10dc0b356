"""Steps 3-4: taggers, tag rules and the edit session with undo."""
