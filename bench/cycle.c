/* Times hook cycles: for each run, each hook in turn (A B C, A B C, ...) runs
 * `<hook> <vmid> pre-start`, `post-start`, `post-stop` as qemu-server would call it (fork,
 * exec, wait), on one CLOCK_MONOTONIC clock; wait4's rusage gives each process's peak RSS.
 *
 *   cycle <runs> <warmup> <vmid> <name>=<hook> ...
 *
 * Prints one line per counted run and hook:
 *   <name> <run> <wall us> <pre-start> <post-start> <post-stop> <peak RSS KiB>
 *   <CPU us> <pre-start> <post-start> <post-stop>
 * A hook that exits non-zero ends the benchmark (exit 1): its stderr is in $BENCH_LOG.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long long now_us(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1000000LL + t.tv_nsec / 1000;
}

static long run(const char *hook, const char *vmid, const char *phase, long long *us,
		long long *cpu)
{
	const char *log = getenv("BENCH_LOG");
	long long t0 = now_us();
	pid_t pid = fork();
	if (pid == 0) {
		int null = open("/dev/null", O_WRONLY);
		int err = log ? open(log, O_WRONLY | O_CREAT | O_APPEND, 0600) : null;
		dup2(null, 1);
		dup2(err, 2);
		execl(hook, hook, vmid, phase, (char *)0);
		_exit(127);
	}
	int status;
	struct rusage ru;
	if (pid < 0 || wait4(pid, &status, 0, &ru) != pid)
		exit(1);
	*us = now_us() - t0;
	*cpu = (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000LL + ru.ru_utime.tv_usec +
	       ru.ru_stime.tv_usec;
	if (!WIFEXITED(status) || WEXITSTATUS(status)) {
		fprintf(stderr, "cycle: %s %s %s failed (status %d)\n", hook, vmid, phase, status);
		exit(1);
	}
	return ru.ru_maxrss;
}

int main(int argc, char **argv)
{
	if (argc < 5)
		return 2;
	int runs = atoi(argv[1]), warmup = atoi(argv[2]);
	const char *vmid = argv[3];
	static const char *phases[] = {"pre-start", "post-start", "post-stop"};
	for (int r = -warmup; r < runs; r++) {
		for (int h = 4; h < argc; h++) {
			char *eq = strchr(argv[h], '=');
			if (!eq)
				return 2;
			long long us[3], cpu[3], total = 0, cpu_total = 0;
			long rss = 0;
			for (int p = 0; p < 3; p++) {
				long m = run(eq + 1, vmid, phases[p], &us[p], &cpu[p]);
				total += us[p];
				cpu_total += cpu[p];
				if (m > rss)
					rss = m;
			}
			if (r >= 0)
				printf("%.*s %d %lld %lld %lld %lld %ld %lld %lld %lld %lld\n",
				       (int)(eq - argv[h]), argv[h], r, total, us[0], us[1], us[2], rss,
				       cpu_total, cpu[0], cpu[1], cpu[2]);
		}
		fflush(stdout);
	}
	return 0;
}
