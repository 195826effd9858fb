"""The scaling plan as Python sees it: one row per parameter (what the Rust plan decided), printed as the Rust
plan's table, and its warnings as `PlanWarning`s."""

import json
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple


class PlanWarning(UserWarning):
    """Something about one parameter that the plan accepts but a person should look at (`possible_readout`,
    `uneven_width_ratio`). Raised through `warnings.warn` when a `gainguard.AdamW` is built, one per parameter,
    so `warnings.filterwarnings("ignore", category=gainguard.PlanWarning)` or `-W error::gainguard.PlanWarning`
    act on it as on any Python warning."""

    def __init__(self, param: str, kind: str, message: str):
        hint = ""
        if "possible_readout" in kind and param.endswith(".weight"):
            hint = f' (from PyTorch: gainguard.mup_readout(model, "{param[: -len(".weight")]}"))'
        super().__init__(f"gainguard plan: {kind}: {message}{hint}")
        self.param = param
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class PlanRow:
    """One parameter's decision. `m` is its width multiplier (fan-in over the base's), `lr`, `weight_decay` and
    `eps` its width-scaled values before any schedule; a tied alias (`tied_to`) is stepped under that name."""

    name: str
    shape: Tuple[int, ...]
    base_shape: Tuple[int, ...]
    cls: str
    m: float
    lr: float
    weight_decay: float
    eps: float
    width_dims: Tuple[int, ...] = ()
    fan_in_dim: Optional[int] = None
    layer: Optional[int] = None
    role: Optional[str] = None
    tied_to: Optional[str] = None
    warnings: Tuple[Tuple[str, str], ...] = field(default=())

    @property
    def matrix_like(self) -> bool:
        return self.cls == "matrix_like"


class Plan:
    """The rows of a built plan, in the order the parameters were given. `str(plan)` is the table (the Rust
    plan's `to_table`), `plan.json()` the Rust plan's JSON; `plan["name"]` is the row of one parameter."""

    def __init__(self, native):
        self._native = native
        eps = {d[0]: d[3] for d in native.decisions()}
        self.rows: List[PlanRow] = [
            PlanRow(
                name=r["name"],
                shape=tuple(r["shape"]),
                base_shape=tuple(r["base_shape"]),
                cls=r["class"],
                m=float(r["width_multiplier"]),
                lr=float(r["lr"]),
                weight_decay=float(r["weight_decay"]),
                eps=float(eps[r["name"]]),
                width_dims=tuple(r.get("width_dims", ())),
                fan_in_dim=r.get("fan_in_dim"),
                layer=r.get("layer"),
                role=r.get("role"),
                tied_to=r.get("tied_to"),
                warnings=tuple((w["kind"], w["message"]) for w in r.get("warnings", ())),
            )
            for r in json.loads(native.json())
        ]
        self._by_name: Dict[str, PlanRow] = {r.name: r for r in self.rows}

    @property
    def warnings(self) -> List[PlanWarning]:
        """One per parameter with something to look at (its kinds joined by ", ", its messages by "; ")."""
        return [
            PlanWarning(r.name, ", ".join(dict.fromkeys(k for k, _ in r.warnings)), "; ".join(m for _, m in r.warnings))
            for r in self.rows
            if r.warnings
        ]

    def json(self) -> str:
        return self._native.json()

    def __getitem__(self, name: str) -> PlanRow:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no parameter {name!r} in the plan") from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[PlanRow]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __str__(self) -> str:
        return self._native.table()

    def __repr__(self) -> str:
        matrix = sum(1 for r in self.rows if r.matrix_like and r.tied_to is None)
        return f"Plan({len(self.rows)} parameters, {matrix} matrix-like, {len(self.warnings)} warnings)"
