"""Who hosts us: the standalone app or the WebUI. Only this package knows the difference."""
