import sys
from pathlib import Path

# pytest runs with --import-mode=importlib: make the area's helper module importable.
sys.path.insert(0, str(Path(__file__).parent))
