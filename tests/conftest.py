import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CHALLENGE_JSON = ROOT.parent / "shared" / "data" / "CVPR_2022_NAS_Track1_test.json"
