"""Steps 3-4: taggers, tag rules and the edit session with undo.

taggers.py   Tagger protocol, DeepDanbooru (deepdanbooru-onnx) and WD14 (onnxruntime), load_tagger, tagger_for
captions.py  tag_dataset: images -> <image>.txt + raw scores; recaption from saved scores
rules.py     the tutorial's editing rules as pure functions, PRESETS, preview/apply_preset
session.py   EditSession: frequencies, filters, bulk and per-image edits, journaled undo/redo
translate.py Chinese names of tags (display and search)
tagtext.py   parsing/writing captions, underscores and kaomoji
data/        the editable word lists and tables the rules use
"""
