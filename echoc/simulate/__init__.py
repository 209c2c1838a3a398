"""`echoc simulate`: routing count traces through load-balancing strategies and the cost model, no GPU.

    traces.py      where counts [steps, layers, ep, E] come from: a recorded file
                   (runtime.routing_trace), a zipf skew, or drifting hot experts
    strategies.py  none / static / shadow / echo: counts [ep, E] of one step → a StepOutcome
    optimum.py     the exact least max rank rows, for small cases
    stepper.py     every step × layer through each strategy, then the metrics (simulate)
    report.py      table, JSON, plot

The public API the CLI and bench use is re-exported here.
"""
from echoc.simulate.report import plot, print_table, write_json
from echoc.simulate.result import SimResult, Stat, StrategyMetrics
from echoc.simulate.stepper import STRATEGIES, simulate
from runtime.routing_trace import TraceError

__all__ = ["STRATEGIES", "SimResult", "Stat", "StrategyMetrics", "TraceError", "plot", "print_table",
           "simulate", "write_json"]
