"""Point labels that keep clear of each other and of the markers: each label tries a few spots
around its point (`repel`); when they still crowd, they become numbers named in a key
(`place_labels`). Pure matplotlib, no keyspace data."""

from __future__ import annotations

from collections.abc import Callable

from matplotlib.figure import Figure

# Where a point's label may go, tried in order: (offset in points, ha, va).
LABEL_SPOTS = (
    ((7, 0), "left", "center"),
    ((-7, 0), "right", "center"),
    ((4, 7), "left", "bottom"),
    ((4, -7), "left", "top"),
    ((-4, 7), "right", "bottom"),
    ((-4, -7), "right", "top"),
)


def overlap(a, b) -> float:
    """Area shared by two display-space boxes."""
    return max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0)) * max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))


def marker_boxes(fig: Figure) -> list:
    """Display-space boxes of every scatter marker in the figure."""
    from matplotlib.transforms import Bbox

    boxes = []
    for ax in fig.axes:
        for collection in ax.collections:
            sizes = collection.get_sizes()
            centers = ax.transData.transform(collection.get_offsets())
            for i, (x, y) in enumerate(centers):
                radius = (sizes[i % len(sizes)] ** 0.5) / 2 * fig.dpi / 72 if len(sizes) else 3
                boxes.append(Bbox([[x - radius, y - radius], [x + radius, y + radius]]))
    return boxes


# For the short numbered labels: rings of spots further out, so that crowded numbers find room.
RING_SPOTS = LABEL_SPOTS + tuple(
    ((round(r * dx), round(r * dy)), ha, va)
    for r in (12, 18, 26, 36)
    for dx, dy, ha, va in (
        (1, 0, "left", "center"), (-1, 0, "right", "center"), (0, 1, "center", "bottom"),
        (0, -1, "center", "top"), (0.7, 0.7, "left", "bottom"), (-0.7, 0.7, "right", "bottom"),
        (0.7, -0.7, "left", "top"), (-0.7, -0.7, "right", "top"),
    )
)  # fmt: skip


def repel(fig: Figure, labels: list, spots: tuple = LABEL_SPOTS) -> float:
    """Put each point label in the first spot around its point (LABEL_SPOTS) that covers no
    other label or marker and stays inside its axes; else in the least covered spot. Returns the
    area (display units²) still covered or outside the axes: 0 when every label sits clear."""
    if not labels:
        return 0.0
    residual = 0.0
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    markers, placed = marker_boxes(fig), []
    for label in labels:
        anchor = label.axes.transData.transform(label.xy)
        others = [m for m in markers if not m.contains(*anchor)]
        frame = label.axes.get_window_extent(renderer)
        costs = []
        for offset, ha, va in spots:
            label.xyann = offset
            label.set(ha=ha, va=va)
            box = label.get_window_extent(renderer)
            cost = sum(overlap(box, o) for o in others + placed)
            cost += box.width * box.height - overlap(box, frame)  # the part outside the axes
            costs.append((cost, offset, ha, va))
            if cost == 0:
                break
        cost, offset, ha, va = min(costs, key=lambda c: c[0])
        residual += cost
        label.xyann = offset
        label.set(ha=ha, va=va)
        placed.append(label.get_window_extent(renderer))
    return residual


def place_labels(fig: Figure, labels: list, legend: Callable[[list[str]], None]) -> None:
    """Label points in place when the labels fit (`repel`); when they crowd, number them and
    let `legend(key)` name each number ('1  d=16, k=1/8'), then place the numbers."""
    legend([])
    if repel(fig, labels) == 0:
        return
    key = []
    for number, label in enumerate(labels, start=1):
        key.append(f"{number}  {label.get_text()}")
        label.set_text(str(number))
    for old in list(fig.legends):
        old.remove()
    legend(key)
    repel(fig, labels, RING_SPOTS)
