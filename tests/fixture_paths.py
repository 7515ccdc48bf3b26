"""Where the test fixtures are: ../shared/data beside the project (GPL files, read in place, never copied)."""

from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ASPIRE = DATA / "aspire_sample_real17"
EMPIAR = DATA / "cryodrgn_empiar10076_real7"
RELION31 = DATA / "cryodrgn_relion31_real5"
RELION5 = DATA / "cryodrgn_relion5_multistack"
TOY = DATA / "cryodrgn_toy_projections_sim1000"
CS = DATA / "cryodrgn_cryosparc_cs"
VOLUME = DATA / "aspire_70s_ribosome_vol65" / "clean70SRibosome_vol_65p.mrc"
