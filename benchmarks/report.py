"""The one table printer of the side-by-side benchmarks (bench_core and those built on it, bench_tls).

A row is a dict: ``figure`` (and optionally a readable ``label``), ``unit``,
``better`` ("higher" or "lower"), one value per server (None: failed, with
``<server>_error``), and precomputed ratios. ``columns`` says which ratios
are shown: (title, row key) pairs. A row's ``winner``, where present, is
named at the end. Stdlib only.
"""


def fmt(v):
    """A figure's value, with as many digits as its size deserves."""
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def times(a, b, better):
    """How many times better ``a`` is than ``b`` (above 1: ``a`` wins), or None without both."""
    if a is None or not b or (better != "higher" and not a):
        return None
    return round(a / b if better == "higher" else b / a, 3)


def print_table(rows, servers, columns, note=None, label_width=38):
    """The rows with one column per server (``-``: no such figure for it, FAILED: failed), the
    ratio ``columns``, ``better`` and the winner; then ``note`` and every failure's reason once."""
    print()
    widths = [max(11, len(s)) for s in servers]
    head = f"{'figure':<{label_width}} {'unit':>6} " + " ".join(f"{s:>{w}}" for s, w in zip(servers, widths))
    head += "".join(f" {title:>{max(7, len(title))}}" for title, _ in columns) + "  better"
    print(head)
    print("-" * len(head))
    for r in rows:
        values = [f"{'-' if s not in r else (fmt(r[s]) if r[s] is not None else 'FAILED'):>{w}}"
                  for s, w in zip(servers, widths)]
        line = f"{r.get('label', r['figure']):<{label_width}} {r['unit']:>6} " + " ".join(values)
        for title, key in columns:
            shown = f"{r[key]:.2f}x" if r.get(key) is not None else "-"
            line += f" {shown:>{max(7, len(title))}}"
        line += f"  {r['better']}"
        if r.get("winner"):
            line += "  -> about equal" if r["winner"] == "equal" else f"  -> {r['winner']} better"
        print(line)
    if note:
        print(f"\n{note}")
    failures = {}  # (server, error) -> figures, so one start failure prints once
    for r in rows:
        for s in servers:
            if r.get(f"{s}_error"):
                failures.setdefault((s, r[f"{s}_error"]), []).append(r.get("label", r["figure"]))
    if failures:
        print("\nfailed figures:")
        for (s, error), labels in failures.items():
            print(f"  {s}: {error}\n      ({'; '.join(labels)})")
