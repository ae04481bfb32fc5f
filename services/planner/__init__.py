"""The planner: turns a goal into a validated task graph (``PlannerService``).

Public surface: :class:`PlannerService` (``start()``/``stop()``), :class:`PlannerSettings`,
template loading (:mod:`services.planner.templates`), intent classification
(:mod:`services.planner.intent`), plan validation (:mod:`services.planner.validation`) and
planning backends (:mod:`services.planner.backends`).
"""

from services.planner.service import PlannerService
from services.planner.settings import PlannerSettings

__all__ = ["PlannerService", "PlannerSettings"]
