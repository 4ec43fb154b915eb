"""A tiny text canvas that draws shapes with characters."""

from flags import FILL, OUTLINE, has
from shapes import Circle, Rect


class Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.width = width
        self.height = height
        self.cells = [[" "] * width for _ in range(height)]

    def draw(self, shape: Rect | Circle, flags: int = OUTLINE) -> None:
        for y in range(self.height):
            for x in range(self.width):
                if shape.contains(x + 0.5, y + 0.5) and (has(flags, FILL) or has(flags, OUTLINE)):
                    self.cells[y][x] = "#" if has(flags, FILL) else "+"

    def render(self) -> str:
        return "\n".join("".join(row) for row in self.cells)
