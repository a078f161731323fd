/*
 * c-plugin: a host program that picks its plugins at run time.
 *
 *     ./main NAME[,NAME...] TEXT
 *
 * For each NAME, in order, it dlopen()s ./plugins/libNAME.so (a path built
 * from argv[1] at run time, relative to the working directory), looks up
 * the symbol `plugin_transform` and applies it to the text. Neither the
 * plugins nor anything they link appear in `ldd ./main`.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef char *(*transform_fn)(const char *input);
typedef const char *(*describe_fn)(void);

static int valid_name(const char *name)
{
    if (*name == '\0')
        return 0;
    for (const char *p = name; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '_'))
            return 0;
    return 1;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s NAME[,NAME...] TEXT\n", argv[0]);
        return 2;
    }

    char *names = strdup(argv[1]);
    char *text = strdup(argv[2]);
    if (names == NULL || text == NULL) {
        perror("strdup");
        return 1;
    }

    printf("input: %s\n", text);
    char *saveptr = NULL;
    for (char *name = strtok_r(names, ",", &saveptr); name != NULL;
         name = strtok_r(NULL, ",", &saveptr)) {
        if (!valid_name(name)) {
            fprintf(stderr, "main: invalid plugin name '%s'\n", name);
            return 2;
        }
        char path[256];
        snprintf(path, sizeof path, "./plugins/lib%s.so", name);

        void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
        if (handle == NULL) {
            fprintf(stderr, "main: cannot load plugin: %s\n", dlerror());
            return 1;
        }
        transform_fn transform = (transform_fn)dlsym(handle, "plugin_transform");
        describe_fn describe = (describe_fn)dlsym(handle, "plugin_describe");
        if (transform == NULL || describe == NULL) {
            fprintf(stderr, "main: %s: missing plugin symbols\n", path);
            return 1;
        }

        char *out = transform(text);
        if (out == NULL) {
            fprintf(stderr, "main: %s failed\n", name);
            return 1;
        }
        printf("%s (%s): %s\n", name, describe(), out);
        free(text);
        text = out;
        dlclose(handle);
    }
    printf("output: %s\n", text);
    free(text);
    free(names);
    return 0;
}
