/* The floor: the least a hook can do to make the benchmark profile's changes and undo them.
 *
 *   floor <vmid> <phase>        (a hookscript's arguments; the rest comes from the environment)
 *
 * pre-start   every /proc/irq/<n>/smp_affinity_list: read, take the VM's CPUs out (the
 *             housekeeping CPUs if none is left), write it if it changed; the default IRQ
 *             affinity: read, write BENCH_HK_MASK;
 * post-start  every thread of QEMU (/proc/<pid>/task): read its comm, sched_getaffinity,
 *             sched_setaffinity (vCPU n -> BENCH_VCPUS[n], the iothread BENCH_IOTHREAD ->
 *             BENCH_IO, the rest -> BENCH_EMU; QEMU does not name iothreads by id, so the
 *             benchmark finds its tid once beforehand); each governor of BENCH_CPUS and vm.stat_interval: read, write;
 * post-stop   every saved value written back, every thread's affinity set back.
 *
 * The old values go to one state file per phase (<root>/run/floor.<vmid>, one write and one
 * fdatasync, as a write-ahead record must be durable), so the floor can undo what it did and
 * nothing else. No parsing beyond the cpulist arithmetic, no checks, no messages: every
 * system call it makes is one the changes need.
 *
 * Environment: PVETUNE_ROOT, BENCH_VM_CPUS (cpulist), BENCH_HK (cpulist), BENCH_HK_MASK,
 * BENCH_VCPUS (e.g. "1,0"), BENCH_EMU, BENCH_IO (cpulists), BENCH_IOTHREAD (a tid), BENCH_POLICIES ("0,1").
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define NBITS 8192
typedef unsigned long long word;
#define WBITS 64
#define NW (NBITS / WBITS)

static const char *root;
static char *out;            /* the state file being built */
static size_t out_len, out_cap;

static void emit(const char *s, size_t n)
{
	if (out_len + n > out_cap) {
		out_cap = (out_len + n) * 2 + 4096;
		out = realloc(out, out_cap);
		if (!out)
			exit(1);
	}
	memcpy(out + out_len, s, n);
	out_len += n;
}

static void parse_list(const char *s, word *set)
{
	memset(set, 0, NW * sizeof(word));
	while (*s && *s != '\n') {
		char *end;
		unsigned a = strtoul(s, &end, 10), b = a;
		if (*end == '-')
			b = strtoul(end + 1, &end, 10);
		for (unsigned i = a; i <= b && i < NBITS; i++)
			set[i / WBITS] |= 1ULL << (i % WBITS);
		s = *end == ',' ? end + 1 : end;
	}
}

static size_t format_list(const word *set, char *buf)
{
	size_t n = 0;
	for (unsigned i = 0; i < NBITS;) {
		if (!(set[i / WBITS] >> (i % WBITS) & 1)) {
			i++;
			continue;
		}
		unsigned j = i;
		while (j + 1 < NBITS && (set[(j + 1) / WBITS] >> ((j + 1) % WBITS) & 1))
			j++;
		n += sprintf(buf + n, n ? ",%u" : "%u", i);
		if (j > i)
			n += sprintf(buf + n, "-%u", j);
		i = j + 1;
	}
	buf[n++] = '\n';
	return n;
}

static ssize_t read_file(const char *path, char *buf, size_t cap)
{
	int fd = open(path, O_RDONLY);
	if (fd < 0)
		return -1;
	ssize_t n = read(fd, buf, cap - 1);
	close(fd);
	if (n >= 0)
		buf[n] = 0;
	return n;
}

static void write_file(const char *path, const char *buf, size_t n)
{
	int fd = open(path, O_WRONLY | O_TRUNC); /* a fixture file needs O_TRUNC; sysfs ignores it */
	if (fd < 0)
		return;
	if (write(fd, buf, n) < 0) {
		/* refused (a managed IRQ): left alone, as every hook does */
	}
	close(fd);
}

/* Records "<path>\t<old value>" and writes the new value. */
static void change(const char *path, const char *old, size_t old_len, const char *new, size_t n)
{
	emit(path, strlen(path));
	emit("\t", 1);
	emit(old, old_len);
	if (!old_len || old[old_len - 1] != '\n')
		emit("\n", 1);
	write_file(path, new, n);
}

static void save(const char *state)
{
	int fd = open(state, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	if (fd < 0 || write(fd, out, out_len) != (ssize_t)out_len || fdatasync(fd))
		exit(1);
	close(fd);
}

/* The next entry of d whose name is a number (an IRQ, a tid), or NULL at the end. */
static const char *next_number(DIR *d)
{
	struct dirent *e;
	while ((e = readdir(d)))
		if (e->d_name[0] >= '0' && e->d_name[0] <= '9')
			return e->d_name;
	return NULL;
}

static DIR *open_dir(const char *path)
{
	DIR *d = opendir(path);
	if (!d)
		exit(1);
	return d;
}

static void pre_start(const char *state)
{
	word vm[NW], hk[NW], set[NW];
	char path[4096], buf[65536], new[65536];
	parse_list(getenv("BENCH_VM_CPUS"), vm);
	parse_list(getenv("BENCH_HK"), hk);
	snprintf(path, sizeof path, "%s/proc/irq", root);
	DIR *d = open_dir(path);
	for (const char *irq; (irq = next_number(d));) {
		snprintf(path, sizeof path, "%s/proc/irq/%s/smp_affinity_list", root, irq);
		ssize_t n = read_file(path, buf, sizeof buf);
		if (n < 0)
			continue;
		parse_list(buf, set);
		int hit = 0, left = 0;
		for (int w = 0; w < NW; w++) {
			hit |= (set[w] & vm[w]) != 0;
			set[w] &= ~vm[w];
			left |= set[w] != 0;
		}
		if (!hit)
			continue;
		size_t m = format_list(left ? set : hk, new);
		change(path, buf, n, new, m);
	}
	closedir(d);
	snprintf(path, sizeof path, "%s/proc/irq/default_smp_affinity", root);
	ssize_t n = read_file(path, buf, sizeof buf);
	const char *mask = getenv("BENCH_HK_MASK");
	snprintf(new, sizeof new, "%s\n", mask);
	if (n >= 0)
		change(path, buf, n, new, strlen(new));
	save(state);
}

static void cpus_of(const char *list, cpu_set_t *cs)
{
	word set[NW];
	parse_list(list, set);
	CPU_ZERO(cs);
	for (unsigned i = 0; i < CPU_SETSIZE; i++)
		if (set[i / WBITS] >> (i % WBITS) & 1)
			CPU_SET(i, cs);
}

static void post_start(const char *vmid, const char *state)
{
	char path[4096], buf[4096];
	snprintf(path, sizeof path, "%s/var/run/qemu-server/%s.pid", root, vmid);
	if (read_file(path, buf, sizeof buf) <= 0)
		exit(1);
	int pid = atoi(buf);
	cpu_set_t emu, io, vcpu[256];
	cpus_of(getenv("BENCH_EMU"), &emu);
	cpus_of(getenv("BENCH_IO"), &io);
	int iothread = atoi(getenv("BENCH_IOTHREAD")), nv = 0;
	for (char *s = getenv("BENCH_VCPUS"); *s && nv < 256; nv++) {
		char *end;
		CPU_ZERO(&vcpu[nv]);
		CPU_SET(strtoul(s, &end, 10), &vcpu[nv]);
		s = *end ? end + 1 : end;
	}
	snprintf(path, sizeof path, "%s/proc/%d/task", root, pid);
	DIR *d = open_dir(path);
	for (const char *name; (name = next_number(d));) {
		int tid = atoi(name);
		snprintf(path, sizeof path, "%s/proc/%d/task/%d/comm", root, pid, tid);
		if (read_file(path, buf, sizeof buf) < 0)
			continue;
		cpu_set_t *to = &emu, old;
		unsigned n;
		if (sscanf(buf, "CPU %u/", &n) == 1 && (int)n < nv)
			to = &vcpu[n];
		if (tid == iothread)
			to = &io;
		if (sched_getaffinity(tid, sizeof old, &old))
			continue;
		int len = snprintf(buf, sizeof buf, "@%d", tid);
		for (unsigned w = 0; w < sizeof old / sizeof(word); w++)
			len += snprintf(buf + len, sizeof buf - len, " %llx", ((word *)&old)[w]);
		buf[len++] = '\n';
		emit(buf, len);
		sched_setaffinity(tid, sizeof *to, to);
	}
	closedir(d);
	char old[4096];
	for (char *s = getenv("BENCH_POLICIES"); *s;) {
		char *end;
		unsigned p = strtoul(s, &end, 10);
		s = *end ? end + 1 : end;
		snprintf(path, sizeof path,
			 "%s/sys/devices/system/cpu/cpufreq/policy%u/scaling_governor", root, p);
		ssize_t n = read_file(path, old, sizeof old);
		if (n >= 0)
			change(path, old, n, "performance\n", 12);
	}
	snprintf(path, sizeof path, "%s/proc/sys/vm/stat_interval", root);
	ssize_t n = read_file(path, old, sizeof old);
	if (n >= 0)
		change(path, old, n, "120\n", 4);
	save(state);
}

/* Undoes one state file: lines "<path>\t<old>" and "@<tid> <words>". */
static void undo(const char *state)
{
	int fd = open(state, O_RDONLY);
	if (fd < 0)
		return;
	size_t cap = 1 << 16, len = 0;
	char *s = malloc(cap);
	ssize_t n;
	while ((n = read(fd, s + len, cap - len - 1)) > 0) {
		len += n;
		if (len + 1 == cap)
			s = realloc(s, cap *= 2);
	}
	close(fd);
	s[len] = 0;
	for (char *line = s, *next; *line; line = next) {
		char *nl = strchr(line, '\n');
		next = nl ? nl + 1 : line + strlen(line);
		if (*line == '@') {
			cpu_set_t cs;
			char *p = line + 1;
			int tid = strtol(p, &p, 10);
			for (unsigned w = 0; w < sizeof cs / sizeof(word); w++)
				((word *)&cs)[w] = strtoull(p, &p, 16);
			sched_setaffinity(tid, sizeof cs, &cs);
			continue;
		}
		char *tab = strchr(line, '\t');
		if (!tab || tab > next)
			continue;
		*tab = 0;
		write_file(line, tab + 1, next - tab - 1);
	}
	unlink(state);
}

int main(int argc, char **argv)
{
	if (argc != 3)
		return 2;
	root = getenv("PVETUNE_ROOT");
	char start[4096], run[4096];
	snprintf(start, sizeof start, "%s/run/floor.%s.pre", root, argv[1]);
	snprintf(run, sizeof run, "%s/run/floor.%s.post", root, argv[1]);
	if (!strcmp(argv[2], "pre-start"))
		pre_start(start);
	else if (!strcmp(argv[2], "post-start"))
		post_start(argv[1], run);
	else if (!strcmp(argv[2], "post-stop")) {
		undo(run);
		undo(start);
	}
	return 0;
}
