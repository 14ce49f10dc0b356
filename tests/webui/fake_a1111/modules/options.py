"""Mirrors modules/options.py: OptionInfo and Options.add_option / attribute access."""


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None,
                 section=None, refresh=None, comment_before="", comment_after="", infotext=None,
                 restrict_api=False, category_id=None):
        self.default = default
        self.label = label
        self.component = component
        self.component_args = component_args
        self.onchange = onchange
        self.section = section
        self.category_id = category_id

    def info(self, info):
        self.comment_after += f" ({info})" if hasattr(self, "comment_after") else ""
        return self

    def needs_reload_ui(self):
        return self


class Options:
    def __init__(self, data_labels=None):
        object.__setattr__(self, "data_labels", dict(data_labels or {}))
        object.__setattr__(self, "data", {k: v.default for k, v in self.data_labels.items()})

    def add_option(self, key, info):
        self.data_labels[key] = info
        if key not in self.data:
            self.data[key] = info.default

    def __getattr__(self, item):
        data = object.__getattribute__(self, "data")
        if item in data:
            return data[item]
        raise AttributeError(item)

    def __setattr__(self, key, value):
        self.data[key] = value
