"""Synthetic token texts for steering tests: paragraph breaks inside tokens ("\\n\\n", ".\\n\\n") and
split over two tokens ("\\n" then a token starting with "\\n")."""


def token_texts(vocab_size: int, moduli: tuple[int, int, int, int] = (7, 11, 13, 17)) -> list[str]:
  """Token i is "\\n\\n" if i % m0 == 0, "\\n" if i % m1 == 3, ".\\n\\n" if i % m2 == 5, "\\nx" if
  i % m3 == 2, else a word."""
  m0, m1, m2, m3 = moduli

  def text(i):
    if i % m0 == 0:
      return "\n\n"
    if i % m1 == 3:
      return "\n"
    if i % m2 == 5:
      return ".\n\n"
    if i % m3 == 2:
      return "\nx"
    return f" w{i}"

  return [text(i) for i in range(vocab_size)]
