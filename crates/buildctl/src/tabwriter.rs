//! The column layout of Go's `text/tabwriter` (left-aligned, no flags), which buildctl's tables
//! use, so the output lines up exactly like stock buildctl's.
//!
//! Text is cells terminated by `\t`; the text after a line's last tab is not part of any column.
//! A column block is a run of consecutive lines that all have a terminated cell in that column;
//! its width is the widest cell plus `padding` (at least `minwidth`). With `\t` as the padding
//! character a cell is padded with tabs up to the next multiple of `tabwidth`. A line without any
//! tab ends every block (Go flushes there).

/// A buffering formatter; [`TabWriter::finish`] returns the laid-out text.
#[derive(Debug)]
pub struct TabWriter {
    minwidth: usize,
    tabwidth: usize,
    padding: usize,
    padchar: char,
    lines: Vec<Vec<String>>,
    out: String,
}

impl TabWriter {
    /// Go's `tabwriter.NewWriter(w, minwidth, tabwidth, padding, padchar, 0)`.
    pub fn new(minwidth: usize, tabwidth: usize, padding: usize, padchar: char) -> Self {
        TabWriter {
            minwidth,
            tabwidth,
            padding,
            padchar,
            lines: Vec::new(),
            out: String::new(),
        }
    }

    /// Adds text (any number of `\n`-terminated lines).
    pub fn write(&mut self, text: &str) {
        for line in text.split_inclusive('\n') {
            let line = line.strip_suffix('\n').unwrap_or(line);
            let cells: Vec<String> = line.split('\t').map(str::to_string).collect();
            let single = cells.len() == 1;
            self.lines.push(cells);
            if single {
                self.flush();
            }
        }
    }

    /// Lays out everything written and returns it.
    pub fn finish(mut self) -> String {
        self.flush();
        self.out
    }

    fn flush(&mut self) {
        let lines = std::mem::take(&mut self.lines);
        let mut widths = Vec::new();
        self.format(&lines, &mut widths, 0, lines.len());
    }

    fn format(&mut self, lines: &[Vec<String>], widths: &mut Vec<usize>, l0: usize, l1: usize) {
        let column = widths.len();
        let mut line0 = l0;
        let mut this = l0;
        while this < l1 {
            if column >= lines[this].len() - 1 {
                this += 1;
                continue;
            }
            // A block starts here: print the lines before it.
            self.write_lines(lines, widths, line0, this);
            line0 = this;
            let mut width = self.minwidth;
            while this < l1 && column < lines[this].len() - 1 {
                width = width.max(lines[this][column].chars().count() + self.padding);
                this += 1;
            }
            widths.push(width);
            self.format(lines, widths, line0, this);
            widths.pop();
            line0 = this;
        }
        self.write_lines(lines, widths, line0, l1);
    }

    fn write_lines(&mut self, lines: &[Vec<String>], widths: &[usize], l0: usize, l1: usize) {
        for line in &lines[l0..l1] {
            for (j, cell) in line.iter().enumerate() {
                self.out.push_str(cell);
                if j < widths.len() {
                    self.pad(cell.chars().count(), widths[j]);
                }
            }
            self.out.push('\n');
        }
    }

    fn pad(&mut self, textw: usize, cellw: usize) {
        if self.padchar == '\t' {
            if self.tabwidth == 0 {
                return;
            }
            let cellw = cellw.div_ceil(self.tabwidth) * self.tabwidth;
            let n = cellw.saturating_sub(textw);
            for _ in 0..n.div_ceil(self.tabwidth) {
                self.out.push('\t');
            }
        } else {
            for _ in textw..cellw {
                self.out.push(self.padchar);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(
        minwidth: usize,
        tabwidth: usize,
        padding: usize,
        padchar: char,
        text: &str,
    ) -> String {
        let mut w = TabWriter::new(minwidth, tabwidth, padding, padchar);
        w.write(text);
        w.finish()
    }

    #[test]
    fn matches_go_tabwriter() {
        // Expected outputs as Go's text/tabwriter lays them out.
        let cases: &[(usize, usize, usize, char, &str, &str)] = &[
            // buildctl debug workers: NewWriter(os.Stdout, 1, 8, 1, '\t', 0)
            (
                1,
                8,
                1,
                '\t',
                "ID\tPLATFORMS\nabcdefghijklmnopqrstuvwxy\tlinux/amd64,linux/386\n",
                "ID\t\t\t\tPLATFORMS\nabcdefghijklmnopqrstuvwxy\tlinux/amd64,linux/386\n",
            ),
            (
                1,
                8,
                1,
                '\t',
                "ID\tPLATFORMS\nw\tx\n",
                "ID\tPLATFORMS\nw\tx\n",
            ),
            // exactly a multiple of the tab width plus padding moves to the next stop
            (1, 8, 1, '\t', "ABCDEFGH\tx\n", "ABCDEFGH\tx\n"),
            (
                1,
                8,
                1,
                '\t',
                "ABCDEFGH\tx\nA\ty\n",
                "ABCDEFGH\tx\nA\t\ty\n",
            ),
            // buildctl debug info: NewWriter(os.Stdout, 0, 0, 1, ' ', 0)
            (
                0,
                0,
                1,
                ' ',
                "BuildKit:\tpkg v1 rev\n",
                "BuildKit: pkg v1 rev\n",
            ),
            // a line without tabs ends the blocks
            (
                0,
                0,
                1,
                ' ',
                "a:\t1\nlonger:\t2\nbreak\nb:\t3\n",
                "a:      1\nlonger: 2\nbreak\nb: 3\n",
            ),
            // nested columns only span the lines that have them
            (
                0,
                0,
                1,
                ' ',
                "Labels:\n\tk1:\tv\n\tlongkey:\tv\nx:\ty\n",
                "Labels:\n   k1:      v\n   longkey: v\nx: y\n",
            ),
        ];
        for (minw, tabw, pad, ch, input, want) in cases {
            assert_eq!(&layout(*minw, *tabw, *pad, *ch, input), want, "{input:?}");
        }
    }
}
